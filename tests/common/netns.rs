//! Test hosts on their own networks: network namespaces joined pairwise by veth links, each
//! end with an address of a private /30 (never any other address). Everything is removed
//! on drop, also when the test fails.

#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Network namespaces, named uniquely for this process, each with loopback up.
pub struct Net {
    pub names: Vec<String>,
    serial: u32,
    /// Each link's two ends: (namespace index, device).
    links: Vec<[(usize, String); 2]>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Net {
    /// `n` namespaces, each joined to every other by a veth pair. The address of node `i`
    /// as node `j` reaches it is [`Net::address`].
    pub fn new(n: usize) -> Net {
        let serial = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{serial}", std::process::id() % 100_000);
        let mut net = Net {
            names: vec![],
            serial,
            links: vec![],
        };
        for i in 0..n {
            let name = format!("strata-{tag}-{i}");
            ip(&["netns", "add", &name]).unwrap();
            net.names.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"]).unwrap();
        }
        for i in 0..n {
            for j in (i + 1)..n {
                let (a, b) = (format!("s{tag}{i}{j}a"), format!("s{tag}{i}{j}b"));
                ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]).unwrap();
                ip(&["link", "set", &a, "netns", &net.names[i]]).unwrap();
                ip(&["link", "set", &b, "netns", &net.names[j]]).unwrap();
                let (addr_a, addr_b) = (
                    net.pair_address(serial, i, j, i),
                    net.pair_address(serial, i, j, j),
                );
                ip(&[
                    "-n",
                    &net.names[i],
                    "addr",
                    "add",
                    &format!("{addr_a}/30"),
                    "dev",
                    &a,
                ])
                .unwrap();
                ip(&[
                    "-n",
                    &net.names[j],
                    "addr",
                    "add",
                    &format!("{addr_b}/30"),
                    "dev",
                    &b,
                ])
                .unwrap();
                ip(&["-n", &net.names[i], "link", "set", &a, "up"]).unwrap();
                ip(&["-n", &net.names[j], "link", "set", &b, "up"]).unwrap();
                net.links.push([(i, a), (j, b)]);
            }
        }
        net
    }

    /// The address node `me` has on its link with the pair (`i`, `j`): 10.231.S.P+1 or +2,
    /// one /30 per pair and per net of this process.
    fn pair_address(&self, serial: u32, i: usize, j: usize, me: usize) -> String {
        let pair = (i * 8 + j) as u32;
        let host = pair * 4 + if me == i { 1 } else { 2 };
        format!("10.231.{}.{}", (std::process::id() + serial) % 250, host)
    }

    /// Where node `of` is reached from node `from`, with `port`.
    pub fn address(&self, of: usize, from: usize, port: u16) -> String {
        let (i, j) = (of.min(from), of.max(from));
        format!("{}:{port}", self.pair_address(self.serial, i, j, of))
    }

    /// The address of node `of` as node `from` reaches it.
    pub fn ip(&self, of: usize, from: usize) -> String {
        let (i, j) = (of.min(from), of.max(from));
        self.pair_address(self.serial, i, j, of)
    }

    /// Cuts node `i` off every link (its peers time out), or brings it back.
    pub fn set_links(&self, i: usize, up: bool) {
        for (ns, dev) in self.links.iter().flatten().filter(|(ns, _)| *ns == i) {
            let state = if up { "up" } else { "down" };
            let _ = ip(&["-n", &self.names[*ns], "link", "set", dev, state]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Removing a namespace removes the veth ends in it (and so their peers).
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
