//! Topology-aware preferred allocation for per-HCA devices: `must_include` first, then the HCAs
//! that keep the allocation on the fewest NUMA nodes and, within one, under the same PCIe root
//! port or switch as those already chosen (what GPUDirect pairing looks for). Deterministic: the
//! same request on the same host always gets the same answer. It is only a hint, never an error.

use std::collections::{BTreeMap, HashSet};

use crate::host::nodes::natural_cmp_str;

/// What the choice knows of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub numa: Option<i64>,
    /// PCI path from the root complex down (`pci0000:3a`, `0000:3a:00.0`, ...).
    pub path: Vec<String>,
    pub healthy: bool,
}

/// How many leading components two PCI paths share (root complex, root port, switch ports).
fn shared_prefix(a: &[String], b: &[String]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Picks `size` IDs: every `must` ID, then from `available` by placement. IDs `place` does not
/// know (not ours, or gone) are taken last, in natural order: Allocate decides about them. The
/// work is linear in the request and quadratic only in the devices `place` knows (the HCAs of
/// one node), so no request can make this slow.
pub fn choose(
    must: &[String],
    available: &[String],
    size: usize,
    place: impl Fn(&str) -> Option<Place>,
) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::new();
    let mut taken: HashSet<&str> = HashSet::new();
    for id in must {
        if taken.insert(id.as_str()) {
            chosen.push(id.clone());
        }
    }
    // Known devices compete by placement; unknown ones only fill what is left.
    let mut pool: Vec<(String, Place)> = Vec::new();
    let mut unknown: Vec<&String> = Vec::new();
    for id in available {
        if !taken.insert(id.as_str()) {
            continue;
        }
        match place(id) {
            Some(p) => pool.push((id.clone(), p)),
            None => unknown.push(id),
        }
    }
    pool.sort_by(|a, b| natural_cmp_str(&a.0, &b.0));
    unknown.sort_by(|a, b| natural_cmp_str(a, b));
    let mut placed: Vec<Place> = chosen.iter().filter_map(|id| place(id)).collect();

    // With nothing chosen yet, start in the NUMA node that can hold the most of the request.
    if placed.is_empty() && chosen.len() < size {
        if let Some(i) = seed(&pool, size) {
            let (id, p) = pool.remove(i);
            chosen.push(id);
            placed.push(p);
        }
    }
    while chosen.len() < size && !pool.is_empty() {
        let numas: Vec<Option<i64>> = placed.iter().map(|p| p.numa).collect();
        // Healthy before unhealthy; a NUMA node in use before a new one (and among new ones,
        // the one that can still supply the most); then the longest PCI path shared with what
        // is chosen; then ID order (the pool is sorted, and min_by_key keeps the first).
        let left = |numa: Option<i64>| {
            pool.iter()
                .filter(|(_, p)| p.healthy && p.numa == numa)
                .count()
        };
        let i = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, p))| {
                let new_numa = !numas.is_empty() && !numas.contains(&p.numa);
                (
                    u8::from(!p.healthy),
                    u8::from(new_numa),
                    if new_numa {
                        usize::MAX - left(p.numa)
                    } else {
                        0
                    },
                    usize::MAX
                        - placed
                            .iter()
                            .map(|c| shared_prefix(&c.path, &p.path))
                            .max()
                            .unwrap_or(0),
                )
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (id, p) = pool.remove(i);
        chosen.push(id);
        placed.push(p);
    }
    for id in unknown {
        if chosen.len() >= size {
            break;
        }
        chosen.push(id.clone());
    }
    chosen
}

/// The first pick: in the NUMA node whose healthy devices can hold most of `size` (on a tie
/// the lowest node, known before unknown), the device with the most neighbours under the same
/// switch.
fn seed(pool: &[(String, Place)], size: usize) -> Option<usize> {
    let mut per_numa: BTreeMap<Option<i64>, usize> = BTreeMap::new();
    for (_, p) in pool.iter().filter(|(_, p)| p.healthy) {
        *per_numa.entry(p.numa).or_default() += 1;
    }
    let numa = per_numa
        .iter()
        .max_by(|a, b| {
            a.1.min(&size)
                .cmp(b.1.min(&size))
                .then_with(|| a.0.is_some().cmp(&b.0.is_some()))
                .then_with(|| b.0.cmp(a.0))
        })
        .map(|(n, _)| *n)?;
    let neighbours = |p: &Place| {
        pool.iter()
            .filter(|(_, q)| {
                q.healthy && q.numa == numa && shared_prefix(&q.path, &p.path) + 1 >= p.path.len()
            })
            .count()
    };
    pool.iter()
        .enumerate()
        .filter(|(_, (_, p))| p.healthy && p.numa == numa)
        .max_by(|(ia, (_, a)), (ib, (_, b))| {
            neighbours(a).cmp(&neighbours(b)).then_with(|| ib.cmp(ia))
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// 8 HCAs: a0..a3 on NUMA 0 (a0,a1 under switch s0; a2,a3 under s1), b0..b3 on NUMA 1.
    fn place(id: &str) -> Option<Place> {
        let (numa, rc) = match id.as_bytes().first()? {
            b'a' => (0, "pci0000:00"),
            b'b' => (1, "pci0000:80"),
            _ => return None,
        };
        let n: u32 = id[1..].parse().ok()?;
        Some(Place {
            numa: Some(numa),
            path: vec![rc.to_string(), format!("sw{}", n / 2), format!("{id}-fn")],
            healthy: id != "a3",
        })
    }

    #[test]
    fn fewest_numa_nodes_then_same_switch_deterministic() {
        let all = ids(&["b3", "a0", "a1", "a2", "a3", "b0", "b1", "b2"]);
        // Two: same NUMA, same switch.
        assert_eq!(choose(&[], &all, 2, place), ["a0", "a1"]);
        // must_include first, then its switch neighbour, then its NUMA node.
        assert_eq!(choose(&ids(&["b2"]), &all, 2, place), ["b2", "b3"]);
        assert_eq!(choose(&ids(&["b2"]), &all, 3, place), ["b2", "b3", "b0"]);
        // Four on NUMA 0 would need the unhealthy a3: NUMA 1 has four healthy.
        assert_eq!(choose(&[], &all, 4, place), ["b0", "b1", "b2", "b3"]);
        // More than one NUMA node holds: spill over only when needed.
        let five = choose(&[], &all, 5, place);
        assert_eq!(&five[..4], ["b0", "b1", "b2", "b3"]);
        assert_eq!(five[4], "a0");
        // Unknown IDs pass through last; the answer never errs or grows past what is offered.
        assert_eq!(choose(&[], &ids(&["zz", "a0"]), 5, place), ["a0", "zz"]);
        assert_eq!(choose(&[], &all, 2, place), choose(&[], &all, 2, place));
    }
}
