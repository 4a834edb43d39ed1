//! `list --frontend dra`: the ResourceSlice(s) this node would publish now (JSON, as sent to the
//! API server, less what only the API server knows: the Node's UID and the generation), and
//! the devices left out with why. Reads the host once, like `list` for the device plugin.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::dra::daemon::Reader;
use crate::dra::slice::{self, Pool};

/// The slice as pretty JSON, then a line per device left out.
pub fn report(cfg: &Config) -> String {
    let node = cfg
        .dra
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .unwrap_or_else(|| "NODE_NAME".to_string());
    let inv = Reader::new(cfg).read();
    let now = slice::now();
    let tainted: BTreeMap<_, _> = inv
        .devices
        .iter()
        .filter(|d| !d.healthy)
        .map(|d| {
            (
                d.name.clone(),
                slice::taint(&cfg.dra.driver, &d.reason, now),
            )
        })
        .collect();
    let pool = Pool {
        driver: &cfg.dra.driver,
        node: &node,
        node_uid: None,
        generation: 1,
    };
    let (slices, left_out) = slice::build(&pool, &inv, &tainted);
    let mut out = String::new();
    for s in &slices {
        out.push_str(&serde_json::to_string_pretty(s).unwrap_or_default());
        out.push('\n');
    }
    for r in &inv.refused {
        out.push_str(&format!("# not published: {r}\n"));
    }
    for name in left_out {
        out.push_str(&format!(
            "# left out: {name} (a pool holds at most {} slices of {} devices)\n",
            slice::MAX_SLICES,
            slice::MAX_DEVICES_TAINTED
        ));
    }
    out
}
