//! The cluster's directory in Redis: node registrations, room claims, and
//! the scripts that change them atomically.
//!
//! Keys (one Redis, not Redis Cluster: the scripts touch keys they compute):
//! - `sb:node:<id>`: the node's [`NodeInfo`] as JSON, expiring
//!   [`NODE_TTL`] after its last keepalive;
//! - `sb:nodes`: the set of node ids ever seen (pruned of expired ones);
//! - `sb:room:<name>`: the id of the node that owns the room, expiring
//!   [`CLAIM_TTL`] after its owner last refreshed it.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::placement::NodeInfo;

pub const NODE_PREFIX: &str = "sb:node:";
pub const NODES_SET: &str = "sb:nodes";
pub const ROOM_PREFIX: &str = "sb:room:";
/// Pub/sub channel of a node's relayed signaling.
pub const RELAY_PREFIX: &str = "sb:relay:";

/// A node whose keepalive stopped is dead after this long.
pub const NODE_TTL: Duration = Duration::from_secs(5);
/// A room claim not refreshed for this long is free.
pub const CLAIM_TTL: Duration = Duration::from_secs(10);

pub fn node_key(id: &str) -> String {
    format!("{NODE_PREFIX}{id}")
}

pub fn room_key(room: &str) -> String {
    format!("{ROOM_PREFIX}{room}")
}

pub fn relay_channel(node: &str) -> String {
    format!("{RELAY_PREFIX}{node}")
}

/// Finds the room's owner, or claims the room for `candidate`.
/// KEYS[1] room key; ARGV: candidate ('' to look up only), claim TTL in ms,
/// node key prefix. Returns {outcome, owner}: `existing` (a live node owns
/// it), `new` (claimed for the candidate), `takeover` (its owner was dead;
/// now the candidate's), `none` (look-up only, no live owner), `stale` (the
/// candidate itself is dead: the caller's view of the nodes is out of date).
const PLACE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and redis.call('EXISTS', ARGV[3] .. cur) == 1 then return {'existing', cur} end
if ARGV[1] == '' then return {'none', ''} end
if redis.call('EXISTS', ARGV[3] .. ARGV[1]) == 0 then return {'stale', ARGV[1]} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if cur then return {'takeover', ARGV[1]} end
return {'new', ARGV[1]}
";

/// Refreshes the claims of the rooms a node holds. KEYS: room keys; ARGV:
/// node id, TTL in ms. Returns the keys some other node holds.
const REFRESH: &str = r"
local lost = {}
for _, k in ipairs(KEYS) do
  local cur = redis.call('GET', k)
  if (not cur) or cur == ARGV[1] then
    redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
  else
    table.insert(lost, k)
  end
end
return lost
";

/// Deletes claims that are still the node's. KEYS: room keys; ARGV: node id.
const RELEASE: &str = r"
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k); n = n + 1 end
end
return n
";

/// What [`Directory::place`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A live node owns the room.
    Existing(String),
    /// The room was free and is now claimed for the candidate.
    Claimed(String),
    /// The room's owner was dead; the room is now the candidate's.
    TakenOver(String),
    /// Look-up only: no live node owns the room.
    Nobody,
    /// The candidate is dead (its registration expired).
    Stale(String),
}

pub struct Directory {
    place: Script,
    refresh: Script,
    release: Script,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            place: Script::new(PLACE),
            refresh: Script::new(REFRESH),
            release: Script::new(RELEASE),
        }
    }
}

impl Directory {
    /// The owner of `room`, claiming it for `candidate` when no live node
    /// owns it (`None`: look up only).
    pub async fn place(
        &self,
        conn: &mut ConnectionManager,
        room: &str,
        candidate: Option<&str>,
    ) -> redis::RedisResult<Found> {
        let (outcome, owner): (String, String) = self
            .place
            .key(room_key(room))
            .arg(candidate.unwrap_or(""))
            .arg(CLAIM_TTL.as_millis() as u64)
            .arg(NODE_PREFIX)
            .invoke_async(conn)
            .await?;
        Ok(match outcome.as_str() {
            "existing" => Found::Existing(owner),
            "new" => Found::Claimed(owner),
            "takeover" => Found::TakenOver(owner),
            "stale" => Found::Stale(owner),
            _ => Found::Nobody,
        })
    }

    /// Announces this node and refreshes its rooms' claims; returns every
    /// live node (itself included) and the rooms another node claims.
    pub async fn keepalive(
        &self,
        conn: &mut ConnectionManager,
        me: &NodeInfo,
        rooms: &[String],
    ) -> redis::RedisResult<(Vec<NodeInfo>, Vec<String>)> {
        let json = serde_json::to_string(me).unwrap_or_default();
        let _: () = redis::pipe()
            .set_options(
                node_key(&me.id),
                json,
                redis::SetOptions::default()
                    .with_expiration(redis::SetExpiry::PX(NODE_TTL.as_millis() as u64)),
            )
            .ignore()
            .sadd(NODES_SET, &me.id)
            .ignore()
            .query_async(conn)
            .await?;
        let mut lost = Vec::new();
        for chunk in rooms.chunks(256) {
            let mut inv = self.refresh.prepare_invoke();
            for room in chunk {
                inv.key(room_key(room));
            }
            let keys: Vec<String> = inv
                .arg(&me.id)
                .arg(CLAIM_TTL.as_millis() as u64)
                .invoke_async(conn)
                .await?;
            lost.extend(
                keys.into_iter()
                    .filter_map(|k| k.strip_prefix(ROOM_PREFIX).map(str::to_owned)),
            );
        }
        let ids: Vec<String> = conn.smembers(NODES_SET).await?;
        if ids.is_empty() {
            return Ok((Vec::new(), lost));
        }
        let keys: Vec<String> = ids.iter().map(|id| node_key(id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (id, value) in ids.iter().zip(values) {
            match value.and_then(|v| serde_json::from_str::<NodeInfo>(&v).ok()) {
                Some(info) if info.id == *id => live.push(info),
                // Expired, or not ours to read: not a node to place rooms on.
                _ => gone.push(id.clone()),
            }
        }
        if !gone.is_empty() {
            let _: () = conn.srem(NODES_SET, &gone).await?;
        }
        Ok((live, lost))
    }

    /// Which of `nodes` are alive (their registration has not expired).
    pub async fn alive(
        &self,
        conn: &mut ConnectionManager,
        nodes: &[String],
    ) -> redis::RedisResult<Vec<bool>> {
        let mut pipe = redis::pipe();
        for n in nodes {
            pipe.exists(node_key(n));
        }
        pipe.query_async(conn).await
    }

    /// Gives up claims still held by `me`.
    pub async fn release(
        &self,
        conn: &mut ConnectionManager,
        me: &str,
        rooms: &[String],
    ) -> redis::RedisResult<()> {
        for chunk in rooms.chunks(256) {
            let mut inv = self.release.prepare_invoke();
            for room in chunk {
                inv.key(room_key(room));
            }
            let _: u64 = inv.arg(me).invoke_async(conn).await?;
        }
        Ok(())
    }

    /// Removes the node's registration (a clean stop).
    pub async fn deregister(
        &self,
        conn: &mut ConnectionManager,
        me: &str,
    ) -> redis::RedisResult<()> {
        redis::pipe()
            .del(node_key(me))
            .ignore()
            .srem(NODES_SET, me)
            .ignore()
            .query_async(conn)
            .await
    }
}
