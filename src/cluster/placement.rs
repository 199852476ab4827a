//! Which node a new room goes to: pure, from the nodes' last announced load.

use serde::{Deserialize, Serialize};

/// What a node announces about itself in Redis (`sb:node:<id>`), refreshed
/// by its keepalive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub participants: u64,
    pub rooms: u64,
    /// Process CPU over the last keepalive period, in cores (1.0 = one core busy).
    pub cpu: f32,
    /// A draining node takes no new rooms.
    pub draining: bool,
    /// Where its media is (`ip:port`), for operators reading Redis.
    #[serde(default)]
    pub media: Option<String>,
}

/// The node a new room should go to: the live, non-draining node with the
/// fewest rooms, then the fewest participants; the id breaks ties so every
/// node picks the same one from the same view.
///
/// Rooms first: a node's view of the others is up to a keepalive old,
/// adjusted only by the rooms it placed itself since, and a new room's
/// participants arrive after it is placed; counting rooms spreads a burst
/// of new rooms evenly where counting participants piled them onto the node
/// whose last announcement was emptiest (measured: 1 room on one node, 3 on
/// the other, for 4 rooms of 4 joining at once). CPU is announced for
/// operators but not compared: at equal load it is noise.
pub fn choose(nodes: &[NodeInfo]) -> Option<&NodeInfo> {
    nodes.iter().filter(|n| !n.draining).min_by(|a, b| {
        a.rooms
            .cmp(&b.rooms)
            .then(a.participants.cmp(&b.participants))
            .then(a.id.cmp(&b.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, participants: u64, rooms: u64, draining: bool) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            participants,
            rooms,
            cpu: 0.0,
            draining,
            media: None,
        }
    }

    #[test]
    fn the_node_with_the_fewest_rooms_then_participants_wins() {
        let nodes = [
            node("a", 4, 1, false),
            node("b", 2, 1, false),
            node("c", 0, 3, false),
        ];
        assert_eq!(choose(&nodes).map(|n| n.id.as_str()), Some("b"));
        let nodes = [node("a", 9, 1, false), node("b", 1, 2, false)];
        assert_eq!(choose(&nodes).map(|n| n.id.as_str()), Some("a"));
    }

    #[test]
    fn a_draining_node_takes_no_new_room() {
        let nodes = [node("a", 9, 3, false), node("b", 0, 0, true)];
        assert_eq!(choose(&nodes).map(|n| n.id.as_str()), Some("a"));
        assert_eq!(choose(&[node("b", 0, 0, true)]), None);
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn ties_go_to_the_same_node_whatever_the_order() {
        let one = [node("b", 1, 1, false), node("a", 1, 1, false)];
        let other = [node("a", 1, 1, false), node("b", 1, 1, false)];
        assert_eq!(choose(&one), choose(&other));
        assert_eq!(choose(&one).map(|n| n.id.as_str()), Some("a"));
    }
}
