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

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// Rendered snapshots by filter, valid until the next event.
    snapshots: HashMap<JobFilter, Bytes>,
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
            snapshots: HashMap::new(),
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
            self.jobs.pop_first();
            self.complete = false;
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
        self.snapshots.clear();
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
    /// matching jobs, newest first, at most `sse.snapshot_jobs`.
    pub fn snapshot(&mut self, filter: &JobFilter) -> Bytes {
        if let Some(frame) = self.snapshots.get(filter) {
            return frame.clone();
        }
        let mut data = String::from("{\"jobs\":[");
        let matching = self
            .jobs
            .values()
            .rev()
            .filter(|job| filter.matches(&job.keys))
            .take(self.size.snapshot);
        for (n, job) in matching.enumerate() {
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
        // Bounded: a storm of distinct filters renders each, keeps a few.
        if self.snapshots.len() >= 256 {
            self.snapshots.clear();
        }
        self.snapshots.insert(filter.clone(), frame.clone());
        frame
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
