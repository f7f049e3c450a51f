//! The board as the SseHub holds it: every open job (up to
//! `sse.index_jobs`), newest first, with the keys its filters compare; the
//! last `sse.history` events; and, for each event, what a client with a
//! given filter is sent.
//!
//! The rules live here, as plain functions of a filter and an event, so the
//! live fan-out, a `Last-Event-ID` resume and a snapshot agree:
//! - a job that is open and matches the filter after the event is sent
//!   whole (`job.posted` or `job.updated`): inserted or replaced by id;
//! - a job that matched before and does not now is sent as `job.closed`
//!   (it closed) or `job.removed` (an edit took it out of the filter), data
//!   `{"id", "version"}`: deleted by id;
//! - anything else is not this client's business and is not sent.
//!
//! "Before" comes with the event: a `job.updated` payload carries the texts
//! the job had (`before`), and a close changes no text. So the hub needs no
//! memory of a job to route its event, and an event that arrives before the
//! job's post (two relays, a backlog) is still routed right; the job's
//! `version` orders what arrives out of order.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::EventCursor;
use crate::domain::{search_keys, topics, JobFilter, JobStatus, SearchKeys};

/// One job event, routed: what each filter is sent of it.
#[derive(Debug)]
pub struct BoardEvent {
    pub cursor: EventCursor,
    pub job: Uuid,
    pub version: i64,
    /// Open after the event, with these keys.
    open: bool,
    keys: SearchKeys,
    /// The keys before the event, if the job was open before it (`None`
    /// for a post).
    before: Option<SearchKeys>,
    /// `job.posted` / `job.updated` with the whole job.
    listed: Bytes,
    /// `job.closed` / `job.removed` with `{"id", "version"}`.
    delisted: Bytes,
}

impl BoardEvent {
    /// The frame a client with `filter` is sent, if any.
    pub fn frame_for(&self, filter: &JobFilter) -> Option<&Bytes> {
        if self.open && filter.matches(&self.keys) {
            Some(&self.listed)
        } else if self.before.as_ref().is_some_and(|k| filter.matches(k)) {
            Some(&self.delisted)
        } else {
            None
        }
    }
}

/// An open job on the board.
struct Listed {
    version: i64,
    keys: SearchKeys,
    /// The job as JSON, ready to go into a snapshot.
    json: Arc<str>,
}

/// What an entry of the jobs stream says, once read.
struct Parsed {
    id: Uuid,
    version: i64,
    open: bool,
    keys: SearchKeys,
    before: Option<SearchKeys>,
    /// The job without `before`, as clients get it.
    job: serde_json::Value,
}

fn text<'a>(job: &'a serde_json::Value, field: &str) -> &'a str {
    job.get(field).and_then(|v| v.as_str()).unwrap_or_default()
}

fn keys_of(job: &serde_json::Value) -> SearchKeys {
    search_keys(
        text(job, "title"),
        text(job, "company"),
        text(job, "location"),
        text(job, "description"),
    )
}

fn parse(topic: &str, mut job: serde_json::Value) -> Option<Parsed> {
    let id = text(&job, "id").parse().ok()?;
    // A job posted before jobs had versions is at its first, and open.
    let version = job.get("version").and_then(|v| v.as_i64()).unwrap_or(1);
    let open = job.get("status").and_then(|v| v.as_str()) != Some(JobStatus::Closed.as_str());
    let before = job.as_object_mut().and_then(|o| o.remove("before"));
    let keys = keys_of(&job);
    let before = match topic {
        topics::JOB_POSTED => None,
        // A close changes no text: it left every filter it was in.
        topics::JOB_CLOSED => Some(keys.clone()),
        _ => before.as_ref().map(keys_of),
    };
    Some(Parsed {
        id,
        version,
        open,
        keys,
        before,
        job,
    })
}

/// One filter's view of the board: the ids of its matching open jobs, the
/// newest `sse.snapshot_jobs` of them (every one, when fewer match). Every
/// event updates it in place ([`Board::apply`]); the board is read only to
/// refill a full view that lost a member, from just below its oldest. So a
/// snapshot costs what it returns, however many jobs the board holds.
struct FilterView {
    ids: BTreeSet<Uuid>,
    /// The frame rendered from it, at the cursor it names.
    rendered: Option<(EventCursor, Bytes)>,
}

/// Views kept at once; past it the least recently read goes (a storm of
/// distinct filters renders each, keeps the recent ones).
const MAX_VIEWS: usize = 4096;

/// How the board is sized (from `[sse]`).
#[derive(Debug, Clone, Copy)]
pub struct BoardSize {
    /// Open jobs held, newest first (`sse.index_jobs`).
    pub jobs: usize,
    /// Jobs in a snapshot (`sse.snapshot_jobs`).
    pub snapshot: usize,
    /// Events kept for resume (`sse.history`).
    pub history: usize,
}

pub struct Board {
    size: BoardSize,
    /// Every stream event at or before this cursor is reflected here.
    pub cursor: EventCursor,
    /// Open jobs by id: UUIDv7 ids sort by time, so the last is the newest.
    jobs: BTreeMap<Uuid, Listed>,
    /// Whether `jobs` holds every open job (it does until more than
    /// `size.jobs` are open at once).
    complete: bool,
    /// Versions of jobs seen closed, bounded: a late event about one of
    /// them is not announced again.
    closed: HashMap<Uuid, i64>,
    closed_order: VecDeque<Uuid>,
    /// The last events, oldest first; every event after `history_floor`.
    history: VecDeque<Arc<BoardEvent>>,
    history_floor: EventCursor,
    /// Each filter's view, kept up to date by every event, and when each
    /// was last read (a count, for eviction).
    views: HashMap<JobFilter, (FilterView, u64)>,
    reads: u64,
}

impl Board {
    /// The board at `cursor`, holding `jobs` (open jobs, newest first, at
    /// most `size.jobs + 1` of them: one more than fits says there are more).
    pub fn load(size: BoardSize, cursor: EventCursor, jobs: Vec<serde_json::Value>) -> Board {
        let complete = jobs.len() <= size.jobs;
        let mut board = Board {
            size,
            cursor,
            jobs: BTreeMap::new(),
            complete,
            closed: HashMap::new(),
            closed_order: VecDeque::new(),
            history: VecDeque::new(),
            history_floor: cursor,
            views: HashMap::new(),
            reads: 0,
        };
        for job in jobs.into_iter().take(size.jobs) {
            if let Some(parsed) = parse(topics::JOB_POSTED, job) {
                board.list(&parsed);
            }
        }
        board
    }

    /// Whether the board holds every open job; when it does not, a
    /// filter's snapshot shows its matches among the newest `sse.index_jobs`.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    fn list(&mut self, job: &Parsed) {
        self.jobs.insert(
            job.id,
            Listed {
                version: job.version,
                keys: job.keys.clone(),
                json: job.job.to_string().into(),
            },
        );
        while self.jobs.len() > self.size.jobs {
            if let Some((oldest, _)) = self.jobs.pop_first() {
                // Nothing older is left to refill from: a view that loses
                // it shows the filter's matches among the newest jobs.
                for (view, _) in self.views.values_mut() {
                    view.ids.remove(&oldest);
                }
            }
            self.complete = false;
        }
    }

    /// Moves every view to what `id` is after an event (open and on the
    /// board with `keys`, or not): in or out of each, refilled from the
    /// board when a full view lost it.
    fn update_views(&mut self, id: Uuid, keys: &SearchKeys) {
        let cap = self.size.snapshot;
        let listed = self.jobs.contains_key(&id);
        for (filter, (view, _)) in &mut self.views {
            if listed && filter.matches(keys) {
                let newer_than_all = view.ids.first().is_none_or(|oldest| id > *oldest);
                if view.ids.len() < cap || newer_than_all {
                    view.ids.insert(id);
                    if view.ids.len() > cap {
                        view.ids.pop_first();
                    }
                }
            } else {
                let floor = view.ids.first().copied();
                let was_full = view.ids.len() >= cap;
                if view.ids.remove(&id) && was_full {
                    // Every match newer than the view's oldest is in it:
                    // the next one is below that.
                    if let Some(floor) = floor {
                        let next = self
                            .jobs
                            .range(..floor)
                            .rev()
                            .find(|(_, job)| filter.matches(&job.keys));
                        if let Some((next, _)) = next {
                            view.ids.insert(*next);
                        }
                    }
                }
            }
        }
    }

    fn remember_closed(&mut self, id: Uuid, version: i64) {
        if self.closed.insert(id, version).is_none() {
            self.closed_order.push_back(id);
        }
        let bound = 2 * (self.size.history + self.size.snapshot).max(1);
        while self.closed_order.len() > bound {
            if let Some(old) = self.closed_order.pop_front() {
                self.closed.remove(&old);
            }
        }
    }

    /// The newest version the board knows of `id`.
    fn known_version(&self, id: Uuid) -> Option<i64> {
        let listed = self.jobs.get(&id).map(|j| j.version);
        let closed = self.closed.get(&id).copied();
        listed.max(closed)
    }

    /// Applies one stream entry: the routed event, or `None` when it
    /// changes nothing (at or before the cursor, a duplicate or an older
    /// version than the board's, not a job event).
    pub fn apply(
        &mut self,
        cursor: EventCursor,
        topic: &str,
        payload: serde_json::Value,
    ) -> Option<Arc<BoardEvent>> {
        if cursor <= self.cursor {
            return None;
        }
        self.cursor = cursor;
        if ![topics::JOB_POSTED, topics::JOB_UPDATED, topics::JOB_CLOSED].contains(&topic) {
            return None;
        }
        let parsed = parse(topic, payload)?;
        if self
            .known_version(parsed.id)
            .is_some_and(|known| known >= parsed.version)
        {
            return None;
        }
        if parsed.open {
            self.list(&parsed);
        } else {
            self.jobs.remove(&parsed.id);
            self.remember_closed(parsed.id, parsed.version);
        }
        self.update_views(parsed.id, &parsed.keys);
        let (listed_name, delisted_name) = match topic {
            topics::JOB_POSTED => (topics::JOB_POSTED, topics::JOB_REMOVED),
            topics::JOB_CLOSED => (topics::JOB_UPDATED, topics::JOB_CLOSED),
            _ => (topics::JOB_UPDATED, topics::JOB_REMOVED),
        };
        let id_version = serde_json::json!({ "id": parsed.id, "version": parsed.version });
        let event = Arc::new(BoardEvent {
            cursor,
            job: parsed.id,
            version: parsed.version,
            open: parsed.open,
            listed: Bytes::from(format!(
                "id: {cursor}\nevent: {listed_name}\ndata: {}\n\n",
                parsed.job
            )),
            delisted: Bytes::from(format!(
                "id: {cursor}\nevent: {delisted_name}\ndata: {id_version}\n\n"
            )),
            keys: parsed.keys,
            before: parsed.before,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.size.history {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.cursor;
            }
        }
        Some(event)
    }

    /// The `snapshot` frame for `filter` at the board's cursor: its open
    /// matching jobs, newest first, at most `sse.snapshot_jobs`. Rendered
    /// from the filter's view (made by one pass over the board the first
    /// time the filter is asked for, then kept by the events).
    pub fn snapshot(&mut self, filter: &JobFilter) -> Bytes {
        self.reads += 1;
        let reads = self.reads;
        if !self.views.contains_key(filter) {
            if self.views.len() >= MAX_VIEWS {
                let least_recent = self
                    .views
                    .iter()
                    .min_by_key(|(_, (_, read))| *read)
                    .map(|(f, _)| f.clone());
                if let Some(least_recent) = least_recent {
                    self.views.remove(&least_recent);
                }
            }
            let ids = self
                .jobs
                .iter()
                .rev()
                .filter(|(_, job)| filter.matches(&job.keys))
                .take(self.size.snapshot)
                .map(|(id, _)| *id)
                .collect();
            let view = FilterView {
                ids,
                rendered: None,
            };
            self.views.insert(filter.clone(), (view, reads));
        }
        let Some((view, read)) = self.views.get_mut(filter) else {
            return Bytes::new();
        };
        *read = reads;
        if let Some((at, frame)) = &view.rendered {
            if *at == self.cursor {
                return frame.clone();
            }
        }
        let mut data = String::from("{\"jobs\":[");
        let listed = view.ids.iter().rev().filter_map(|id| self.jobs.get(id));
        for (n, job) in listed.enumerate() {
            if n > 0 {
                data.push(',');
            }
            data.push_str(&job.json);
        }
        data.push_str("]}");
        let frame = Bytes::from(format!(
            "id: {}\nevent: snapshot\ndata: {data}\n\n",
            self.cursor
        ));
        view.rendered = Some((self.cursor, frame.clone()));
        frame
    }

    /// How many views are kept (a gauge's worth, for tests and metrics).
    pub fn views(&self) -> usize {
        self.views.len()
    }

    /// Whether a client that saw everything up to `after` can be caught up
    /// from the history (no snapshot).
    pub fn covers(&self, after: EventCursor) -> bool {
        after >= self.history_floor && after <= self.cursor
    }

    /// What a client with `filter` missed after `after`, newest event per
    /// job only, in stream order; `None` when the history does not reach
    /// back that far.
    pub fn missed(&self, after: EventCursor, filter: &JobFilter) -> Option<Vec<(Uuid, Bytes)>> {
        if !self.covers(after) {
            return None;
        }
        let mut seen = std::collections::HashSet::new();
        let mut frames: Vec<(Uuid, Bytes)> = self
            .history
            .iter()
            .rev()
            .take_while(|e| e.cursor > after)
            .filter_map(|e| e.frame_for(filter).map(|f| (e.job, f.clone())))
            .filter(|(job, _)| seen.insert(*job))
            .collect();
        frames.reverse();
        Some(frames)
    }

    /// How many history events a resume after `after` reads back (what
    /// [`Self::missed`] scans): what the resume is charged by.
    pub fn events_after(&self, after: EventCursor) -> usize {
        self.history
            .iter()
            .rev()
            .take_while(|e| e.cursor > after)
            .count()
    }

    /// The window a resume must fall in to be cheap: (floor, cursor].
    pub fn resume_window(&self) -> (EventCursor, EventCursor) {
        (self.history_floor, self.cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn size() -> BoardSize {
        BoardSize {
            jobs: 100,
            snapshot: 10,
            history: 100,
        }
    }

    fn cursor(n: u64) -> EventCursor {
        EventCursor::parse(&format!("{n}-0")).unwrap()
    }

    fn job(id: Uuid, version: i64, location: &str, status: &str) -> serde_json::Value {
        json!({"id": id, "title": "Rust", "company": "Acme", "location": location,
               "description": "d", "status": status, "version": version})
    }

    fn filter(location: &str) -> JobFilter {
        JobFilter::from_pairs([("location", location.to_string())]).unwrap()
    }

    fn event_name(frame: Option<&Bytes>) -> Option<String> {
        let text = std::str::from_utf8(frame?).unwrap();
        Some(
            text.lines()
                .nth(1)?
                .trim_start_matches("event: ")
                .to_string(),
        )
    }

    #[test]
    fn an_edit_out_of_a_filter_removes_and_into_one_inserts_and_a_close_removes_from_both() {
        let mut board = Board::load(size(), cursor(1), Vec::new());
        let (berlin, paris) = (filter("Berlin"), filter("Paris"));
        let id = Uuid::now_v7();
        let posted = board
            .apply(cursor(2), topics::JOB_POSTED, job(id, 1, "Berlin", "open"))
            .unwrap();
        assert_eq!(
            event_name(posted.frame_for(&berlin)).as_deref(),
            Some("job.posted")
        );
        assert_eq!(event_name(posted.frame_for(&paris)), None);
        let mut moved = job(id, 2, "Paris", "open");
        moved["before"] = job(id, 1, "Berlin", "open");
        let moved = board.apply(cursor(3), topics::JOB_UPDATED, moved).unwrap();
        assert_eq!(
            event_name(moved.frame_for(&berlin)).as_deref(),
            Some("job.removed")
        );
        assert_eq!(
            event_name(moved.frame_for(&paris)).as_deref(),
            Some("job.updated")
        );
        let closed = board
            .apply(cursor(4), topics::JOB_CLOSED, job(id, 3, "Paris", "closed"))
            .unwrap();
        assert_eq!(event_name(closed.frame_for(&berlin)), None, "already gone");
        assert_eq!(
            event_name(closed.frame_for(&paris)).as_deref(),
            Some("job.closed")
        );
        assert!(board.is_empty());
        // A late duplicate or an older version changes nothing.
        assert!(board
            .apply(cursor(5), topics::JOB_POSTED, job(id, 1, "Berlin", "open"))
            .is_none());
        // Resume: Berlin missed the removal; Paris, the close (its newest:
        // each client gets the newest of what was its business).
        let missed = |f: &JobFilter| -> Vec<Option<String>> {
            board
                .missed(cursor(2), f)
                .unwrap()
                .iter()
                .map(|(_, frame)| event_name(Some(frame)))
                .collect()
        };
        assert_eq!(missed(&berlin), [Some("job.removed".to_string())]);
        assert_eq!(missed(&paris), [Some("job.closed".to_string())]);
        assert!(
            board.missed(cursor(0), &paris).is_none(),
            "before the history"
        );
    }

    #[test]
    fn a_snapshot_is_the_filter_s_open_jobs_newest_first() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let jobs = ids
            .iter()
            .rev()
            .map(|id| job(*id, 1, "Berlin", "open"))
            .collect();
        let mut board = Board::load(size(), cursor(1), jobs);
        let mut moved = job(ids[1], 2, "Paris", "open");
        moved["before"] = job(ids[1], 1, "Berlin", "open");
        board.apply(cursor(2), topics::JOB_UPDATED, moved).unwrap();
        let frame = board.snapshot(&filter("berlin"));
        let text = std::str::from_utf8(&frame).unwrap();
        let data: serde_json::Value =
            serde_json::from_str(text.lines().nth(2).unwrap().trim_start_matches("data: "))
                .unwrap();
        let listed: Vec<&str> = data["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = [ids[3], ids[2], ids[0]]
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(listed, expected);
        assert!(text.starts_with("id: 2-0\n"));
    }

    /// The ids in a snapshot frame, in order.
    fn snapshot_ids(frame: &Bytes) -> Vec<Uuid> {
        let text = std::str::from_utf8(frame).unwrap();
        let data: serde_json::Value =
            serde_json::from_str(text.lines().nth(2).unwrap().trim_start_matches("data: "))
                .unwrap();
        data["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn a_kept_view_is_what_a_full_pass_over_the_board_would_show_after_every_event() {
        // Small views (3) over many jobs, moved, closed and posted in a
        // fixed pseudo-random order; after each event every view is
        // compared with the answer worked out from scratch.
        // (A board that holds every job: what it drops past its size is
        // another test's.)
        let small = BoardSize {
            jobs: 1000,
            snapshot: 3,
            history: 100,
        };
        let mut board = Board::load(small, cursor(1), Vec::new());
        let places = ["Berlin", "Paris", "Lima"];
        let filters: Vec<JobFilter> = places
            .iter()
            .map(|p| filter(p))
            .chain([JobFilter::default()])
            .collect();
        // The model: every job's place and whether it is open, and version.
        let mut model: BTreeMap<Uuid, (usize, bool, i64)> = BTreeMap::new();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for f in &filters {
            board.snapshot(f);
        }
        for step in 0..600u64 {
            let open: Vec<Uuid> = model
                .iter()
                .filter(|(_, (_, open, _))| *open)
                .map(|(id, _)| *id)
                .collect();
            let at = cursor(2 + step);
            match next(3) {
                0 if !open.is_empty() => {
                    let id = open[next(open.len() as u64) as usize];
                    let (place, _, version) = model[&id];
                    let to = next(3) as usize;
                    let mut moved = job(id, version + 1, places[to], "open");
                    moved["before"] = job(id, version, places[place], "open");
                    board.apply(at, topics::JOB_UPDATED, moved);
                    model.insert(id, (to, true, version + 1));
                }
                1 if !open.is_empty() => {
                    let id = open[next(open.len() as u64) as usize];
                    let (place, _, version) = model[&id];
                    board.apply(
                        at,
                        topics::JOB_CLOSED,
                        job(id, version + 1, places[place], "closed"),
                    );
                    model.insert(id, (place, false, version + 1));
                }
                _ => {
                    let id = Uuid::now_v7();
                    let place = next(3) as usize;
                    board.apply(at, topics::JOB_POSTED, job(id, 1, places[place], "open"));
                    model.insert(id, (place, true, 1));
                }
            }
            let on_board: Vec<(Uuid, usize)> = model
                .iter()
                .rev()
                .filter(|(_, (_, open, _))| *open)
                .map(|(id, (place, _, _))| (*id, *place))
                .take(small.jobs)
                .collect();
            for (k, f) in filters.iter().enumerate() {
                let expected: Vec<Uuid> = on_board
                    .iter()
                    .filter(|(_, place)| k == places.len() || *place == k)
                    .map(|(id, _)| *id)
                    .take(small.snapshot)
                    .collect();
                assert_eq!(
                    snapshot_ids(&board.snapshot(f)),
                    expected,
                    "step {step}, {f:?}"
                );
            }
        }
        assert_eq!(board.views(), filters.len());
    }

    #[test]
    fn an_edit_that_arrives_before_its_post_is_shown_and_the_post_is_not() {
        let mut board = Board::load(size(), cursor(1), Vec::new());
        let id = Uuid::now_v7();
        let mut edited = job(id, 2, "Berlin", "open");
        edited["before"] = job(id, 1, "Berlin", "open");
        let edited = board.apply(cursor(2), topics::JOB_UPDATED, edited).unwrap();
        assert_eq!(
            event_name(edited.frame_for(&JobFilter::default())).as_deref(),
            Some("job.updated")
        );
        assert!(board
            .apply(cursor(3), topics::JOB_POSTED, job(id, 1, "Berlin", "open"))
            .is_none());
        assert_eq!(board.len(), 1);
    }

    #[test]
    fn past_its_size_the_board_keeps_the_newest_jobs_and_says_it_is_incomplete() {
        let small = BoardSize { jobs: 2, ..size() };
        let mut board = Board::load(small, cursor(1), Vec::new());
        assert!(board.is_complete());
        for n in 0..3 {
            board.apply(
                cursor(2 + n),
                topics::JOB_POSTED,
                job(Uuid::now_v7(), 1, "x", "open"),
            );
        }
        assert_eq!(board.len(), 2);
        assert!(!board.is_complete());
    }
}
