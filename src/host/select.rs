//! Which HCAs a resource grants: by name pattern (with `!` exclusions), link layer, PCI vendor
//! and device IDs, and PCI address. Each selector is a plain value that parses from the text of
//! a flag, so a resource spec can reuse them as keys. An HCA is selected when it passes every
//! selector given; an empty [`Selector`] selects everything (and grants what it always did).

use std::fmt;

use crate::host::sysfs::{Hca, LinkLayer};

/// A parse failure, naming the flag's value and what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// Link layers a selection asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkSelect {
    Any,
    Only(LinkLayer),
}

impl LinkSelect {
    pub fn parse(raw: &str) -> Result<LinkSelect, ParseError> {
        match raw.to_ascii_lowercase().as_str() {
            "any" => Ok(LinkSelect::Any),
            "infiniband" | "ib" => Ok(LinkSelect::Only(LinkLayer::InfiniBand)),
            "ethernet" | "roce" | "eth" => Ok(LinkSelect::Only(LinkLayer::Ethernet)),
            _ => Err(ParseError(format!(
                "link layer {raw:?}: expected infiniband, ethernet or any"
            ))),
        }
    }
}

/// HCAs to take, by pattern, and HCAs to leave out (`!pattern`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamePatterns {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl NamePatterns {
    /// `mlx5_*,!mlx5_2`: comma-separated names or glob patterns (`*`, `?`).
    pub fn parse(raw: &str) -> Result<NamePatterns, ParseError> {
        let mut p = NamePatterns::default();
        for item in split_list(raw) {
            let (list, pat) = match item.strip_prefix('!') {
                Some(rest) => (&mut p.exclude, rest),
                None => (&mut p.include, item),
            };
            if pat.is_empty() || !pat.bytes().all(|b| b.is_ascii_graphic()) || pat.contains('!') {
                return Err(ParseError(format!(
                    "HCA pattern {item:?}: expected a name such as mlx5_0 or a pattern such as mlx5_*, optionally after '!'"
                )));
            }
            list.push(pat.to_string());
        }
        if p.include.is_empty() && p.exclude.is_empty() {
            return Err(ParseError("no HCA pattern given".into()));
        }
        Ok(p)
    }
}

/// A PCI vendor and device ID pair, `15b3:101b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
}

impl PciId {
    /// `15b3:101b,15b3:1021`; `15b3:*` takes every device of a vendor.
    pub fn parse_list(raw: &str) -> Result<Vec<PciIdPattern>, ParseError> {
        let mut out = Vec::new();
        for item in split_list(raw) {
            let bad = || {
                ParseError(format!(
                    "PCI ID {item:?}: expected VENDOR:DEVICE in hex, such as 15b3:101b or 15b3:*"
                ))
            };
            let (v, d) = item.split_once(':').ok_or_else(bad)?;
            let hex = |s: &str| {
                let s = s.strip_prefix("0x").unwrap_or(s);
                (s.len() == 4)
                    .then(|| u16::from_str_radix(s, 16).ok())
                    .flatten()
            };
            let vendor = hex(v).ok_or_else(bad)?;
            let device = if d == "*" {
                None
            } else {
                Some(hex(d).ok_or_else(bad)?)
            };
            out.push(PciIdPattern { vendor, device });
        }
        if out.is_empty() {
            return Err(ParseError("no PCI ID given".into()));
        }
        Ok(out)
    }
}

/// A vendor with one device, or every device of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdPattern {
    pub vendor: u16,
    pub device: Option<u16>,
}

impl fmt::Display for PciIdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.device {
            Some(d) => write!(f, "{:04x}:{d:04x}", self.vendor),
            None => write!(f, "{:04x}:*", self.vendor),
        }
    }
}

/// PCI addresses or patterns: `0000:3b:00.0,0000:86:*`.
pub fn parse_pci_addrs(raw: &str) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    for item in split_list(raw) {
        let ok = !item.is_empty()
            && item
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'*' | b'?'));
        if !ok {
            return Err(ParseError(format!(
                "PCI address {item:?}: expected DOMAIN:BUS:DEVICE.FUNCTION such as 0000:3b:00.0 (patterns with * allowed)"
            )));
        }
        out.push(item.to_ascii_lowercase());
    }
    if out.is_empty() {
        return Err(ParseError("no PCI address given".into()));
    }
    Ok(out)
}

fn split_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Every selector of one resource; `Default` selects every HCA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub names: Option<NamePatterns>,
    pub link: LinkSelect,
    pub pci_ids: Vec<PciIdPattern>,
    pub pci_addrs: Vec<String>,
}

impl Default for Selector {
    fn default() -> Selector {
        Selector {
            names: None,
            link: LinkSelect::Any,
            pci_ids: Vec::new(),
            pci_addrs: Vec::new(),
        }
    }
}

/// Why an HCA is or is not selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Selected,
    Excluded(String),
}

impl Verdict {
    pub fn is_selected(&self) -> bool {
        *self == Verdict::Selected
    }
}

impl Selector {
    /// True when no selector is given: every node is granted, whether sysfs knows it or not
    /// (the drop-in behaviour).
    pub fn is_empty(&self) -> bool {
        *self == Selector::default()
    }

    /// Whether `hca` is selected, and if not, by which selector it was left out.
    pub fn check(&self, hca: &Hca) -> Verdict {
        if let Some(names) = &self.names {
            if let Some(p) = names.exclude.iter().find(|p| glob(p, &hca.name)) {
                return Verdict::Excluded(format!("excluded by --hcas !{p}"));
            }
            if !names.include.is_empty() && !names.include.iter().any(|p| glob(p, &hca.name)) {
                return Verdict::Excluded(format!("not in --hcas {}", names.include.join(",")));
            }
        }
        if let LinkSelect::Only(want) = &self.link {
            if !hca.has_link_layer(want) {
                let have = hca.link_layers();
                let have = if have.is_empty() {
                    "unknown (no ports in sysfs)".to_string()
                } else {
                    have.join(",")
                };
                return Verdict::Excluded(format!("link layer {have}, not {}", want.as_str()));
            }
        }
        if !self.pci_ids.is_empty() {
            let pci = hca.pci.as_ref();
            let ids = pci.and_then(|p| Some((p.vendor?, p.device?)));
            let hit = ids.is_some_and(|(v, d)| {
                self.pci_ids
                    .iter()
                    .any(|p| p.vendor == v && p.device.is_none_or(|pd| pd == d))
            });
            if !hit {
                let have = ids.map_or("unknown".to_string(), |(v, d)| format!("{v:04x}:{d:04x}"));
                return Verdict::Excluded(format!("PCI ID {have} not in --pci-ids"));
            }
        }
        if !self.pci_addrs.is_empty() {
            let addr = hca.pci.as_ref().map(|p| p.address.as_str());
            if !addr.is_some_and(|a| self.pci_addrs.iter().any(|p| glob(p, a))) {
                return Verdict::Excluded(format!(
                    "PCI address {} not in --pci-addrs",
                    addr.unwrap_or("unknown")
                ));
            }
        }
        Verdict::Selected
    }

    /// The flags this selector came from, for log lines (`--hcas mlx5_* --link-layer infiniband`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = &self.names {
            let mut items = n.include.clone();
            items.extend(n.exclude.iter().map(|e| format!("!{e}")));
            parts.push(format!("--hcas {}", items.join(",")));
        }
        if let LinkSelect::Only(l) = &self.link {
            parts.push(format!("--link-layer {}", l.as_str().to_ascii_lowercase()));
        }
        if !self.pci_ids.is_empty() {
            let ids: Vec<String> = self.pci_ids.iter().map(ToString::to_string).collect();
            parts.push(format!("--pci-ids {}", ids.join(",")));
        }
        if !self.pci_addrs.is_empty() {
            parts.push(format!("--pci-addrs {}", self.pci_addrs.join(",")));
        }
        if parts.is_empty() {
            "every HCA".into()
        } else {
            parts.join(" ")
        }
    }
}

/// Shell-style matching of `*` (any run) and `?` (one character); iterative, so a hostile
/// pattern cannot blow the stack, and linear in practice.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::sysfs::{Pci, Port};

    fn hca(name: &str, link: LinkLayer, ids: (u16, u16), addr: &str) -> Hca {
        Hca {
            name: name.into(),
            pci: Some(Pci {
                address: addr.into(),
                vendor: Some(ids.0),
                device: Some(ids.1),
                ..Pci::default()
            }),
            ports: vec![Port {
                number: 1,
                state: None,
                phys_state: None,
                link_layer: Some(link),
                rate: None,
            }],
            ..Hca::default()
        }
    }

    #[test]
    fn globs() {
        assert!(glob("mlx5_*", "mlx5_10"));
        assert!(glob("mlx?_1", "mlx5_1"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("mlx5_*", "mlx4_0"));
        assert!(!glob("mlx5_1", "mlx5_10"));
        assert!(glob("0000:3b:*", "0000:3b:00.1"));
        assert!(!glob(&"*a".repeat(50), &"a".repeat(40)));
    }

    #[test]
    fn selectors_compose_and_say_why() {
        let ib = hca(
            "mlx5_0",
            LinkLayer::InfiniBand,
            (0x15b3, 0x101b),
            "0000:3b:00.0",
        );
        let roce = hca(
            "mlx5_1",
            LinkLayer::Ethernet,
            (0x15b3, 0x101d),
            "0000:86:00.0",
        );
        let intel = hca(
            "irdma0",
            LinkLayer::Ethernet,
            (0x8086, 0x1592),
            "0000:af:00.0",
        );
        assert!(Selector::default().is_empty());
        assert!(Selector::default().check(&roce).is_selected());

        let s = Selector {
            names: Some(NamePatterns::parse("mlx5_*,!mlx5_1").unwrap()),
            ..Selector::default()
        };
        assert!(s.check(&ib).is_selected());
        assert_eq!(
            s.check(&roce),
            Verdict::Excluded("excluded by --hcas !mlx5_1".into())
        );
        assert_eq!(
            s.check(&intel),
            Verdict::Excluded("not in --hcas mlx5_*".into())
        );

        let s = Selector {
            link: LinkSelect::parse("infiniband").unwrap(),
            ..Selector::default()
        };
        assert!(s.check(&ib).is_selected());
        assert_eq!(
            s.check(&roce),
            Verdict::Excluded("link layer Ethernet, not InfiniBand".into())
        );

        let s = Selector {
            pci_ids: PciId::parse_list("15b3:*").unwrap(),
            pci_addrs: parse_pci_addrs("0000:86:*").unwrap(),
            ..Selector::default()
        };
        assert!(s.check(&roce).is_selected());
        assert!(!s.check(&ib).is_selected());
        assert_eq!(
            s.check(&intel),
            Verdict::Excluded("PCI ID 8086:1592 not in --pci-ids".into())
        );
        assert_eq!(s.describe(), "--pci-ids 15b3:* --pci-addrs 0000:86:*");
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in ["", ",", "!", "mlx5 0", "a!b"] {
            assert!(NamePatterns::parse(bad).is_err(), "{bad:?}");
        }
        for bad in ["15b3", "15b3:1", "zzzz:101b", "15b3:101b:1", ""] {
            assert!(PciId::parse_list(bad).is_err(), "{bad:?}");
        }
        for bad in ["0000:3b:00.0/", "", "mlx5_0"] {
            assert!(parse_pci_addrs(bad).is_err(), "{bad:?}");
        }
        assert!(LinkSelect::parse("token-ring").is_err());
        assert_eq!(
            PciId::parse_list("0x15B3:101b").unwrap(),
            [PciIdPattern {
                vendor: 0x15b3,
                device: Some(0x101b)
            }]
        );
    }
}
