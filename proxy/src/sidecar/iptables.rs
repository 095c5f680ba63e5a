//! `postern iptables`: the nat rules that steer a pod's TCP through the
//! sidecar, installed by an init container before any app container starts.
//!
//! Rule generation ([`render`], [`render_cleanup`]) is pure and works on the
//! text `iptables-save` prints; only [`Tools::existing`] and [`Tools::restore`] run commands
//! (`iptables-save` and `iptables-restore`, or their IPv6 twins). Everything
//! for one address family goes in as one `iptables-restore --noflush`
//! transaction on the nat table, so a pod never sees half a rule set and a
//! rerun replaces the rules instead of adding to them.
//!
//! The layout, in the nat table of each family:
//!
//! - `PREROUTING -p tcp -j POSTERN_INBOUND`: inbound TCP, minus excluded
//!   ports, goes to `POSTERN_IN_REDIRECT`, which redirects to the inbound
//!   capture port (15006).
//! - `OUTPUT -p tcp -j POSTERN_OUTPUT`: outbound TCP from the app goes to
//!   `POSTERN_REDIRECT`, which redirects to the outbound capture port (15001).
//!   Skipped: the proxy's own UID and GID (or it would loop), loopback (the
//!   app talking to itself), DNS over TCP (unless `--capture-dns`), excluded
//!   ports and CIDRs. The proxy calling its own pod's IP goes through
//!   `POSTERN_INBOUND`, so a call the app makes to its own service is
//!   handled by inbound policy like any other caller's.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::str::FromStr;

/// Inbound chain: decides which inbound TCP is captured.
pub const CHAIN_INBOUND: &str = "POSTERN_INBOUND";
/// Redirects to the inbound capture port.
pub const CHAIN_IN_REDIRECT: &str = "POSTERN_IN_REDIRECT";
/// Outbound chain: decides which outbound TCP is captured.
pub const CHAIN_OUTPUT: &str = "POSTERN_OUTPUT";
/// Redirects to the outbound capture port.
pub const CHAIN_REDIRECT: &str = "POSTERN_REDIRECT";
/// Every chain Postern owns, in the order they are declared.
pub const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// Errors of `postern iptables`: bad flags or a failing command.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// A port or port range that does not parse.
    #[error("invalid port {value:?}: expected a port 1-65535 or a range like 8000-8100")]
    Port {
        /// The text given.
        value: String,
    },
    /// A CIDR that does not parse.
    #[error("invalid CIDR {value:?}: {reason}")]
    Cidr {
        /// The text given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A command could not be started (not installed, not executable).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
}

/// One destination port or an inclusive range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    /// A single port.
    One(u16),
    /// `first..=last`, with `first < last`.
    Range(u16, u16),
}

impl FromStr for PortSpec {
    type Err = IptablesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IptablesError::Port {
            value: s.to_owned(),
        };
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
        match s.split_once('-') {
            None => port(s).map(PortSpec::One).ok_or_else(err),
            Some((a, b)) => match (port(a), port(b)) {
                (Some(a), Some(b)) if a < b => Ok(PortSpec::Range(a, b)),
                (Some(a), Some(b)) if a == b => Ok(PortSpec::One(a)),
                _ => Err(err()),
            },
        }
    }
}

impl fmt::Display for PortSpec {
    /// The form `--dport` takes: `80` or `8000:8100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::One(p) => write!(f, "{p}"),
            PortSpec::Range(a, b) => write!(f, "{a}:{b}"),
        }
    }
}

/// A comma-separated list of ports and ranges; empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortSpec>);

impl FromStr for PortList {
    type Err = IptablesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(PortSpec::from_str)
            .collect::<Result<_, _>>()
            .map(PortList)
    }
}

/// Which inbound ports are captured: all (`*`) or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every port not excluded.
    All,
    /// Only these ports (an empty list captures no inbound traffic).
    Only(Vec<PortSpec>),
}

impl FromStr for InboundPorts {
    type Err = IptablesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            Ok(InboundPorts::All)
        } else {
            PortList::from_str(s).map(|l| InboundPorts::Only(l.0))
        }
    }
}

/// An address block; the host bits are cleared when parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The family the block belongs to.
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = IptablesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| IptablesError::Cidr {
            value: s.to_owned(),
            reason,
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| err("prefix length out of range"))?,
            None => max,
        };
        // iptables clears host bits itself; doing it here keeps the printed
        // rules equal to what iptables-save shows afterwards.
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of CIDRs; empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = IptablesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(Cidr::from_str)
            .collect::<Result<_, _>>()
            .map(CidrList)
    }
}

/// An address family, and with it which command set is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables-*`.
    V4,
    /// IPv6: `ip6tables-*`.
    V6,
}

impl Family {
    /// The family's loopback block. The whole of 127/8 rather than
    /// 127.0.0.1 alone, so the proxy may reach the app on any loopback
    /// address without being sent back to its own inbound port.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// What to capture and what to leave alone. [`Default`] is the sidecar
/// convention: proxy UID and GID 1337, outbound to 15001, inbound to 15006,
/// every inbound port, nothing excluded, DNS left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// UID the proxy runs as; its traffic is never captured.
    pub proxy_uid: u32,
    /// GID the proxy runs as; its traffic is never captured.
    pub proxy_gid: u32,
    /// Where captured outbound TCP is redirected.
    pub outbound_port: u16,
    /// Where captured inbound TCP is redirected.
    pub inbound_port: u16,
    /// Inbound ports to capture.
    pub include_inbound: InboundPorts,
    /// Inbound ports never captured (checked before `include_inbound`).
    pub exclude_inbound: Vec<PortSpec>,
    /// Outbound destination ports never captured.
    pub exclude_outbound: Vec<PortSpec>,
    /// Outbound destinations never captured; each goes to its family only.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Capture DNS over TCP (port 53) like any other TCP. UDP is never
    /// captured: Postern proxies TCP only.
    pub capture_dns: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            include_inbound: InboundPorts::All,
            exclude_inbound: Vec::new(),
            exclude_outbound: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            capture_dns: false,
        }
    }
}

/// What `iptables-save -t nat` showed of Postern's rules before a change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Postern's chains that exist.
    pub chains: Vec<String>,
    /// Rules of other chains that jump to one of Postern's, as printed
    /// (`-A OUTPUT -p tcp -j POSTERN_OUTPUT`).
    pub jumps: Vec<String>,
}

impl Existing {
    /// Picks Postern's chains and the jumps to them out of `iptables-save`
    /// output; the rest of the table is ignored.
    pub fn parse(save: &str) -> Existing {
        let mut existing = Existing::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
                continue;
            }
            if !in_nat {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if CHAINS.contains(&name) {
                    existing.chains.push(name.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                let target = rule
                    .split_whitespace()
                    .skip_while(|w| *w != "-j")
                    .nth(1)
                    .unwrap_or_default();
                if !CHAINS.contains(&chain) && CHAINS.contains(&target) {
                    existing.jumps.push(line.to_owned());
                }
            }
        }
        existing
    }
}

/// The rules of one family, one `-A` line each, in order: the rules of
/// Postern's chains, then the two jumps into them.
pub fn rules(config: &CaptureConfig, family: Family) -> Vec<String> {
    let mut rules = Vec::new();
    let mut add = |chain: &str, spec: String| rules.push(format!("-A {chain} {spec}"));
    let (uid, gid) = (config.proxy_uid, config.proxy_gid);
    let loopback = family.loopback();

    add(
        CHAIN_IN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", config.inbound_port),
    );
    add(
        CHAIN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", config.outbound_port),
    );

    for port in &config.exclude_inbound {
        add(
            CHAIN_INBOUND,
            format!("-p tcp -m tcp --dport {port} -j RETURN"),
        );
    }
    match &config.include_inbound {
        InboundPorts::All => add(CHAIN_INBOUND, format!("-p tcp -j {CHAIN_IN_REDIRECT}")),
        InboundPorts::Only(ports) => {
            for port in ports {
                add(
                    CHAIN_INBOUND,
                    format!("-p tcp -m tcp --dport {port} -j {CHAIN_IN_REDIRECT}"),
                );
            }
        }
    }

    if !config.capture_dns {
        add(
            CHAIN_OUTPUT,
            "-p tcp -m tcp --dport 53 -j RETURN".to_owned(),
        );
    }
    // The proxy calling its own pod IP (routed over lo): treat it as an
    // inbound call. POSTERN_INBOUND returns here for excluded ports, and the
    // owner rules below then let the call through unredirected.
    for owner in [format!("--uid-owner {uid}"), format!("--gid-owner {gid}")] {
        add(
            CHAIN_OUTPUT,
            format!("-o lo ! -d {loopback} -m owner {owner} -j {CHAIN_INBOUND}"),
        );
    }
    // Everything else over lo is the app talking to itself.
    add(CHAIN_OUTPUT, "-o lo -j RETURN".to_owned());
    // The proxy's own upstream calls must leave as they are, or they loop.
    add(
        CHAIN_OUTPUT,
        format!("-m owner --uid-owner {uid} -j RETURN"),
    );
    add(
        CHAIN_OUTPUT,
        format!("-m owner --gid-owner {gid} -j RETURN"),
    );
    for port in &config.exclude_outbound {
        add(
            CHAIN_OUTPUT,
            format!("-p tcp -m tcp --dport {port} -j RETURN"),
        );
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        add(CHAIN_OUTPUT, format!("-d {cidr} -j RETURN"));
    }
    add(CHAIN_OUTPUT, format!("-j {CHAIN_REDIRECT}"));

    add("PREROUTING", format!("-p tcp -j {CHAIN_INBOUND}"));
    add("OUTPUT", format!("-p tcp -j {CHAIN_OUTPUT}"));
    rules
}

/// The `iptables-restore --noflush` input that installs [`rules`] over
/// `existing`: it declares (so creates or empties) Postern's chains,
/// deletes the old jumps into them, and adds everything afresh.
pub fn render(config: &CaptureConfig, family: Family, existing: &Existing) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for jump in &existing.jumps {
        let _ = writeln!(out, "-D {}", jump.trim_start_matches("-A "));
    }
    for rule in rules(config, family) {
        out.push_str(&rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// The `iptables-restore --noflush` input that removes the jumps and
/// chains in `existing`, or `None` when there is nothing to remove.
pub fn render_cleanup(existing: &Existing) -> Option<String> {
    if existing.chains.is_empty() && existing.jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for jump in &existing.jumps {
        let _ = writeln!(out, "-D {}", jump.trim_start_matches("-A "));
    }
    // Flush them all before deleting any: they refer to each other.
    for chain in &existing.chains {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &existing.chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Which iptables build to run: the distribution's default, or one backend
/// by name (a pod's network namespace must use the one its kernel has).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-restore` and friends, as installed.
    #[default]
    Default,
    /// `iptables-nft-restore` and friends.
    Nft,
    /// `iptables-legacy-restore` and friends.
    Legacy,
}

/// The commands of one family and backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// Prints the table (`iptables-save`).
    pub save: String,
    /// Applies a transaction (`iptables-restore`).
    pub restore: String,
}

impl Tools {
    /// The command names for `family` with `backend`.
    pub fn new(family: Family, backend: Backend) -> Tools {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let infix = match backend {
            Backend::Default => "",
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
        };
        Tools {
            save: format!("{base}{infix}-save"),
            restore: format!("{base}{infix}-restore"),
        }
    }

    /// Reads Postern's part of the nat table.
    pub fn existing(&self) -> Result<Existing, IptablesError> {
        run(&self.save, &["-t", "nat"], None).map(|out| Existing::parse(&out))
    }

    /// Applies a transaction; on failure the error holds the command's stderr
    /// (which names the failing line).
    pub fn restore(&self, transaction: &str) -> Result<(), IptablesError> {
        // --wait: a legacy backend holds the xtables lock while others write.
        run(&self.restore, &["--noflush", "--wait"], Some(transaction)).map(drop)
    }
}

/// Runs `program args`, feeding `stdin`, and returns its stdout.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error means the command exited early; its status and
        // stderr below say why, which is more useful than EPIPE.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| IptablesError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(IptablesError::Failed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether to program IPv6 too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// When `ip6tables-save -t nat` works (the kernel has IPv6 nat).
    #[default]
    Auto,
    /// Always; a failure is an error.
    True,
    /// Never.
    False,
}

/// `postern iptables`: flags of the capture init container.
#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// UID the proxy runs as; its traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID the proxy runs as; its traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_gid: u32,
    /// Port captured outbound TCP is redirected to.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port captured inbound TCP is redirected to.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports to capture: `*` or a list like `8080,9000-9100`.
    #[arg(long, default_value = "*")]
    pub include_inbound_ports: InboundPorts,
    /// Inbound ports never captured, e.g. `22,9000-9100`.
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: PortList,
    /// Outbound destination ports never captured.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: PortList,
    /// Outbound destination CIDRs never captured (IPv4 and IPv6 mixed).
    #[arg(long, default_value = "")]
    pub exclude_outbound_cidrs: CidrList,
    /// Capture DNS over TCP (port 53) too; by default it goes out directly.
    #[arg(long)]
    pub capture_dns: bool,
    /// Program IPv6 as well: auto (when ip6tables works), true or false.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,
    /// Which iptables build to run.
    #[arg(long, value_enum, default_value_t = Backend::Default)]
    pub backend: Backend,
    /// Print the iptables-restore input for a fresh network namespace and
    /// change nothing.
    #[arg(long, conflicts_with = "cleanup")]
    pub dry_run: bool,
    /// Remove Postern's jumps and chains (nothing to remove is no error).
    #[arg(long)]
    pub cleanup: bool,
}

impl IptablesArgs {
    /// The capture settings the flags describe.
    pub fn config(&self) -> CaptureConfig {
        CaptureConfig {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            include_inbound: self.include_inbound_ports.clone(),
            exclude_inbound: self.exclude_inbound_ports.0.clone(),
            exclude_outbound: self.exclude_outbound_ports.0.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.0.clone(),
            capture_dns: self.capture_dns,
        }
    }
}

/// Runs `postern iptables`: prints, installs or removes the rules. What was
/// applied is printed to stdout, so the init container's log shows it.
///
/// # Errors
///
/// The first command that fails, with its stderr. With `--ipv6 auto` an
/// unusable ip6tables only skips IPv6 (with a note on stderr).
pub fn run_cli(args: &IptablesArgs) -> Result<(), IptablesError> {
    let config = args.config();
    if args.dry_run {
        for family in families(args.ipv6) {
            println!("# {}", family.name());
            print!("{}", render(&config, family, &Existing::default()));
        }
        return Ok(());
    }
    for family in families(args.ipv6) {
        let tools = Tools::new(family, args.backend);
        let existing = match (tools.existing(), family, args.ipv6) {
            (Ok(existing), _, _) => existing,
            (Err(err), Family::V6, Ipv6Mode::Auto) => {
                eprintln!("note: skipping IPv6, ip6tables is not usable here: {err}");
                continue;
            }
            (Err(err), _, _) => return Err(err),
        };
        let transaction = if args.cleanup {
            match render_cleanup(&existing) {
                Some(t) => t,
                None => {
                    println!("# {}: nothing to remove", family.name());
                    continue;
                }
            }
        } else {
            render(&config, family, &existing)
        };
        println!("# {}", family.name());
        print!("{transaction}");
        tools.restore(&transaction)?;
    }
    Ok(())
}

fn families(ipv6: Ipv6Mode) -> Vec<Family> {
    match ipv6 {
        Ipv6Mode::False => vec![Family::V4],
        Ipv6Mode::Auto | Ipv6Mode::True => vec![Family::V4, Family::V6],
    }
}

#[cfg(test)]
mod tests;
