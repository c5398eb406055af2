//! `cargo xtask cluster up|down|status`: a three-server NATS cluster on loopback with
//! routes and JetStream (each server its own store directory), and the fleet's buckets
//! stored on all three. It is what `cargo xtask fleet-sim` runs against, and what the
//! fleet smoke run of `cargo xtask test` starts on free ports and always stops.
//!
//! The servers outlive the command (they are in their own process group): `down` stops
//! them by the PIDs recorded in the cluster directory, `up` again restarts the ones that
//! died (for instance the one a fleet simulation killed).

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Servers in the cluster: the smallest that keeps a quorum when one is lost.
pub const NODES: usize = 3;
/// First client port of `cluster up`; routes and monitoring take the next blocks.
const DEFAULT_PORT: u16 = 14222;
/// How long servers get to answer their health checks and elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

const USAGE: &str = "\
usage: cargo xtask cluster <up|down|status> [--dir DIR] [--port PORT]

  up      start three nats-server processes on 127.0.0.1 with routes between them and
          JetStream (store in DIR/n1..n3), wait until they are healthy, then create the
          fleet's buckets with 3 replicas (`collector fleet init --replicas 3`). Servers
          of DIR that are already running are kept; dead ones are started again.
  down    stop the servers of DIR (SIGTERM, then SIGKILL after 5 s) and delete DIR
  status  show each server's PID and whether it runs

  --dir DIR    where configs, stores, logs and cluster.json go (default target/cluster)
  --port PORT  client port of the first server (default 14222): clients use PORT..PORT+2,
               routes PORT+2000.., monitoring PORT+4000..

cluster.json in DIR lists the client URLs and each server's PID, for `cargo xtask
fleet-sim` and for `--nats-url` (comma-separated).";

/// One server of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub client: u16,
    pub route: u16,
    pub monitor: u16,
}

/// A cluster's directory and ports.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// The cluster with consecutive port blocks from `port`.
    pub fn with_base_port(dir: PathBuf, port: u16) -> Result<Self> {
        let top = port.checked_add(4000 + NODES as u16);
        if port < 1024 || top.is_none() {
            bail!(
                "--port {port}: expected a port from 1024 to {}",
                65535 - 4000 - NODES
            );
        }
        let nodes = (0..NODES as u16)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                client: port + i,
                route: port + 2000 + i,
                monitor: port + 4000 + i,
            })
            .collect();
        Ok(Self { dir, nodes })
    }

    /// The cluster on ports the system says are free now.
    pub fn on_free_ports(dir: PathBuf) -> Result<Self> {
        let mut listeners = Vec::new();
        for _ in 0..NODES * 3 {
            listeners.push(TcpListener::bind("127.0.0.1:0").context("find a free port")?);
        }
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?;
        let nodes = (0..NODES)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                client: ports[i],
                route: ports[NODES + i],
                monitor: ports[2 * NODES + i],
            })
            .collect();
        Ok(Self { dir, nodes })
    }

    /// The client URLs, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn pid_file(&self, node: &Node) -> PathBuf {
        self.dir.join(format!("{}.pid", node.name))
    }

    /// The PID of `node` when it runs.
    fn running_pid(&self, node: &Node) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file(node))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // The PID may have been reused since: it must still be a nats-server.
        crate::procs::runs(pid, "nats-server").then_some(pid)
    }

    fn config(&self, node: &Node) -> String {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.route))
            .collect();
        format!(
            "# Written by `cargo xtask cluster up`.\n\
             server_name: \"{name}\"\n\
             listen: \"127.0.0.1:{client}\"\n\
             http: \"127.0.0.1:{monitor}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 4GB\n\
             \x20 # Every agent holds a consumer on each bucket it watches, and one on the\n\
             \x20 # module store while it downloads: nats-server 2.15's default of 1,000\n\
             \x20 # consumers per stream would cap a fleet at about 1,000 agents.\n\
             \x20 limits {{ default_max_consumers: -1 }}\n}}\n\
             cluster {{\n  name: \"collector\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
            name = node.name,
            client = node.client,
            monitor = node.monitor,
            route = node.route,
            store = self.dir.join(&node.name).display(),
            routes = routes.join(", "),
        )
    }

    /// Starts the servers that do not run, and waits until every one is healthy.
    pub fn start(&self, nats_server: &Path) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        for node in &self.nodes {
            if let Some(pid) = self.running_pid(node) {
                eprintln!("xtask: {} already runs (pid {pid})", node.name);
                continue;
            }
            let conf = self.dir.join(format!("{}.conf", node.name));
            // A server started again keeps the config (and the ports) it had.
            if !conf.exists() {
                std::fs::write(&conf, self.config(node))?;
            }
            let log = std::fs::File::create(self.dir.join(format!("{}.log", node.name)))?;
            let child = crate::procs::detach(&mut Command::new(nats_server))
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group: a Ctrl-C in the terminal that ran `up` does not
                // reach it; `down` stops it.
                .spawn()
                .with_context(|| format!("cannot start {}", nats_server.display()))?;
            std::fs::write(self.pid_file(node), child.id().to_string())?;
            eprintln!(
                "xtask: started {} (pid {}, client port {})",
                node.name,
                child.id(),
                node.client
            );
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in &self.nodes {
            loop {
                match http_get(node.monitor, "/healthz") {
                    Ok((200, _)) => break,
                    Ok((code, body)) if Instant::now() > deadline => bail!(
                        "{} is not healthy after {READY_TIMEOUT:?} ({code}: {}); see {}",
                        node.name,
                        body.trim(),
                        self.dir.join(format!("{}.log", node.name)).display()
                    ),
                    Err(e) if Instant::now() > deadline => bail!(
                        "{} does not answer on its monitoring port {} after {READY_TIMEOUT:?} \
                         ({e}); see {}",
                        node.name,
                        node.monitor,
                        self.dir.join(format!("{}.log", node.name)).display()
                    ),
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        self.write_description()?;
        Ok(())
    }

    /// `cluster.json`: the URLs and each server's PID and ports.
    fn write_description(&self) -> Result<()> {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "    {{\"name\": \"{}\", \"pid\": {}, \"url\": \"nats://127.0.0.1:{}\", \
                     \"monitor\": \"http://127.0.0.1:{}\", \"store\": \"{}\"}}",
                    n.name,
                    self.running_pid(n).unwrap_or(0),
                    n.client,
                    n.monitor,
                    self.dir.join(&n.name).display()
                )
            })
            .collect();
        let text = format!(
            "{{\n  \"urls\": \"{}\",\n  \"nodes\": [\n{}\n  ]\n}}\n",
            self.urls(),
            nodes.join(",\n")
        );
        std::fs::write(self.dir.join("cluster.json"), text)?;
        Ok(())
    }

    /// Stops every server of the directory: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&self) {
        let pids: Vec<(String, u32)> = self
            .nodes
            .iter()
            .filter_map(|n| self.running_pid(n).map(|p| (n.name.clone(), p)))
            .collect();
        for (_, pid) in &pids {
            crate::procs::terminate(*pid);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, pid) in pids {
            let alive = |pid| crate::procs::runs(pid, "nats-server");
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                crate::procs::kill(pid);
            }
            eprintln!("xtask: stopped {name} (pid {pid})");
        }
    }

    /// Reads the ports back from the configs `up` wrote in `dir`.
    pub fn open(dir: PathBuf) -> Result<Self> {
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let name = format!("n{i}");
            let path = dir.join(format!("{name}.conf"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}: no cluster there", path.display()))?;
            let port = |key: &str| -> Result<u16> {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(key))
                    .and_then(|rest| rest.trim().trim_matches('"').rsplit(':').next())
                    .and_then(|p| p.trim_matches('"').parse().ok())
                    .with_context(|| format!("{}: no `{key}` port", path.display()))
            };
            nodes.push(Node {
                client: port("listen:")?,
                monitor: port("http:")?,
                route: 0,
                name,
            });
        }
        Ok(Self { dir, nodes })
    }
}

/// Stops a cluster when dropped, whatever happened meanwhile.
pub struct Stopper(pub Cluster);

impl Drop for Stopper {
    fn drop(&mut self) {
        self.0.stop();
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

/// A plain HTTP/1.0 GET on the monitoring port: status code and body.
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP response")?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// Creates the fleet's buckets with three replicas, retrying while the cluster elects
/// its JetStream leader.
pub fn create_buckets(cluster: &Cluster, collector: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let out = Command::new(collector)
            .args(["fleet", "init", "--replicas", "3", "--nats-url"])
            .arg(cluster.urls())
            .output()
            .with_context(|| format!("cannot run {}", collector.display()))?;
        if out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stdout));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "`collector fleet init --replicas 3` kept failing for {READY_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `cargo xtask cluster ...`.
pub fn command(args: &[String], root: &Path) -> Result<()> {
    let mut dir = root.join("target/cluster");
    let mut port = DEFAULT_PORT;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--dir" => {
                let d = PathBuf::from(rest.next().context("--dir needs a directory")?);
                // Absolute: cluster.json is read from other directories.
                dir = std::env::current_dir()?.join(d);
            }
            "--port" => {
                let p = rest.next().context("--port needs a number")?;
                port = p
                    .parse()
                    .with_context(|| format!("--port {p}: expected a port number"))?;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown flag `{other}`\n\n{USAGE}"),
        }
    }
    match args.first().map(String::as_str) {
        Some("up") => {
            let cluster = if dir.join("n1.conf").exists() {
                Cluster::open(dir.clone())?
            } else {
                Cluster::with_base_port(dir.clone(), port)?
            };
            let nats = crate::ensure_nats_server()?;
            cluster.start(&nats)?;
            let collector = crate::build_collector()?;
            create_buckets(&cluster, &collector)?;
            eprintln!(
                "xtask: cluster up: {} (stop it with `cargo xtask cluster down`)",
                dir.join("cluster.json").display()
            );
            println!("{}", cluster.urls());
            Ok(())
        }
        Some("down") => {
            if !dir.exists() {
                eprintln!("xtask: no cluster in {}", dir.display());
                return Ok(());
            }
            let cluster = Cluster::open(dir.clone())?;
            cluster.stop();
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot delete {}", dir.display()))?;
            Ok(())
        }
        Some("status") => {
            let cluster = Cluster::open(dir)?;
            for node in &cluster.nodes {
                match cluster.running_pid(node) {
                    Some(pid) => println!(
                        "{}  running  pid {pid}  nats://127.0.0.1:{}",
                        node.name, node.client
                    ),
                    None => println!("{}  stopped  nats://127.0.0.1:{}", node.name, node.client),
                }
            }
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
