# Herald: multi-stage build. The build stage compiles the release binary
# (SQLite is compiled in; rustls, so no system TLS library); the runtime
# stage is Debian slim with only CA certificates, running as a non-root user.
#
#   docker build -t herald .
#   docker run --env-file /etc/herald/herald.env -p 8080:8080 -p 127.0.0.1:9091:9091 herald
#
# The image is production-shaped: HERALD_MODE=production, so without
# HERALD_DATABASE_URL=postgres://… (and HERALD_REDIS_URL, HERALD_ADMIN_TOKEN,
# HERALD_JWT_SECRET, RESEND_API_KEY, SENTRY_DSN: docs/DEPLOY.md) it exits 2
# naming what is missing instead of running embedded. For a one-file try-out
# pass HERALD_MODE=embedded (docs/DEPLOY.md).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin herald \
    && cp target/release/herald /herald

FROM debian:bookworm-slim
# ca-certificates: HTTPS to Resend and Sentry. Versions follow the base
# image's point release (security updates), so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/herald --shell /usr/sbin/nologin herald \
    && mkdir -p /var/lib/herald \
    && chown 10001:10001 /var/lib/herald
COPY --from=build /herald /usr/local/bin/herald
# The `herald` user made above, by number (resolvable on any host).
USER 10001:10001
WORKDIR /var/lib/herald
# Production unless told otherwise; listeners on every interface inside the
# container: publish the admin port to loopback only. Dev login stays off on
# 0.0.0.0 unless HERALD_AUTH__DEV_LOGIN=true is passed.
ENV HERALD_MODE=production \
    HERALD_LISTEN=0.0.0.0:8080 \
    HERALD_ADMIN_LISTEN=0.0.0.0:9091 \
    HERALD_STATE_DIR=/var/lib/herald \
    HERALD_LOG__FORMAT=json
VOLUME ["/var/lib/herald"]
EXPOSE 8080 9091
# `docker stop` sends SIGTERM: Herald drains and exits within
# shutdown_deadline_ms (10 s), inside Docker's default 10 s only if lowered;
# run with `--stop-timeout 15`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["herald", "healthcheck"]
ENTRYPOINT ["herald"]
CMD ["serve"]
