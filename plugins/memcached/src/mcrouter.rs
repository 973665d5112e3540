//! The mcrouter configuration the proxy reads (`config.json`): one pool
//! holding the ready backends and a route chosen by the topology.
//!
//! The shapes are the ones the mcrouter wiki gives for its two common setups:
//!
//! * **sharded** ("Sharded pools setup"): `"route": "PoolRoute|backends"`.
//!   A `PoolRoute` hashes each key (consistent hashing, `Ch3`) onto one
//!   server, so every key lives on exactly one backend and the cache's
//!   capacity is the sum of the backends'.
//! * **replicated** ("Replicated pools setup"): an `OperationSelectorRoute`
//!   sending `add`, `set` and `delete` to every server (`AllSyncRoute`) and
//!   `get` to one server chosen from mcrouter's host id with failover to the
//!   others (`LatestRoute`). We also set `default_policy` to the same
//!   `AllSyncRoute`, as the memcached-operator from the talk does, so the
//!   other mutations (`incr`, `decr`, `append`, `touch`, ...) reach every
//!   replica too instead of mcrouter's default null reply.
//!
//! With zero ready backends the pool lists zero servers: mcrouter then has
//! no destination, gets miss and updates are not stored, which is what a
//! cache with no capacity should do. The proxy keeps running, so clients
//! reconnect to nothing new when backends return: the next config lists
//! them and rolls the proxy.
//!
//! The document is built from typed structs (field order fixed, maps
//! sorted) and pretty-printed, so the same backends always give the same
//! bytes, hence the same content hash and no write.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::Topology;

/// The name of the one pool in the configuration.
pub const POOL: &str = "backends";

#[derive(Serialize)]
struct Config<'a> {
    pools: BTreeMap<&'static str, Pool<'a>>,
    route: Route,
}

#[derive(Serialize)]
struct Pool<'a> {
    servers: &'a [String],
}

/// A route handle, in mcrouter's short string form or as an object.
#[derive(Serialize)]
#[serde(untagged)]
enum Route {
    Short(String),
    OperationSelector {
        #[serde(rename = "type")]
        type_: &'static str,
        default_policy: String,
        operation_policies: BTreeMap<&'static str, String>,
    },
}

fn route(topology: Topology) -> Route {
    match topology {
        Topology::Sharded => Route::Short(format!("PoolRoute|{POOL}")),
        Topology::Replicated => {
            let all = format!("AllSyncRoute|Pool|{POOL}");
            Route::OperationSelector {
                type_: "OperationSelectorRoute",
                default_policy: all.clone(),
                operation_policies: BTreeMap::from([
                    ("add", all.clone()),
                    ("delete", all.clone()),
                    ("get", format!("LatestRoute|Pool|{POOL}")),
                    ("set", all),
                ]),
            }
        }
    }
}

/// Renders `config.json` for `servers` (`host:port` strings, in the order
/// the pool should list them) and `topology`.
pub fn render(topology: Topology, servers: &[String]) -> String {
    let config = Config {
        pools: BTreeMap::from([(POOL, Pool { servers })]),
        route: route(topology),
    };
    let mut text =
        serde_json::to_string_pretty(&config).expect("the mcrouter config always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn parsed(topology: Topology, servers: &[String]) -> Value {
        serde_json::from_str(&render(topology, servers)).unwrap()
    }

    #[test]
    fn sharded_routes_to_the_pool() {
        let servers = vec!["10.0.0.1:11211".to_owned()];
        assert_eq!(
            parsed(Topology::Sharded, &servers),
            json!({"pools": {"backends": {"servers": ["10.0.0.1:11211"]}}, "route": "PoolRoute|backends"})
        );
    }

    #[test]
    fn replicated_writes_everywhere_and_reads_one() {
        let config = parsed(Topology::Replicated, &[]);
        assert_eq!(config["pools"]["backends"]["servers"], json!([]));
        let route = &config["route"];
        assert_eq!(route["type"], "OperationSelectorRoute");
        assert_eq!(route["default_policy"], "AllSyncRoute|Pool|backends");
        assert_eq!(
            route["operation_policies"],
            json!({
                "add": "AllSyncRoute|Pool|backends",
                "delete": "AllSyncRoute|Pool|backends",
                "get": "LatestRoute|Pool|backends",
                "set": "AllSyncRoute|Pool|backends"
            })
        );
    }

    #[test]
    fn rendering_is_byte_stable() {
        let servers = vec!["10.0.0.1:11211".to_owned(), "10.0.0.2:11211".to_owned()];
        assert_eq!(
            render(Topology::Replicated, &servers),
            render(Topology::Replicated, &servers)
        );
        assert!(render(Topology::Sharded, &servers).ends_with("}\n"));
    }
}
