//! A single-node KRaft broker of a test's own, for a test that needs broker settings the
//! shared broker lacks, or a broker it can stop: its directory, its properties and its
//! formatted storage, from the Kafka jars that `scripts/services up` fetched. Each test starts
//! the prepared broker its own way (a child process it kills, or a watchdog).

use std::path::PathBuf;
use std::process::Command;

/// A broker's files, its storage formatted, not started yet.
pub(crate) struct Prepared {
    /// Its own directory (data, properties, log), under the system's temporary directory.
    pub(crate) dir: PathBuf,
    /// Its `server.properties`.
    pub(crate) props: PathBuf,
    /// The Java classpath of the Kafka jars.
    pub(crate) classpath: String,
    /// The `-Dlog4j2.configurationFile=...` argument.
    pub(crate) log4j: String,
}

/// Prepares a broker named `name` (in its directory's name) that listens on `listen_port`
/// (and `controller_port`) and advertises `advertised`, with the usual single-node settings
/// and the lines of `settings` (each ending in a newline).
pub(crate) fn prepare(
    name: &str,
    listen_port: u16,
    controller_port: u16,
    advertised: &str,
    settings: &str,
) -> Prepared {
    let cache = std::env::var_os("KOURIER_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kourier"),
        PathBuf::from,
    );
    let version = std::env::var("KOURIER_KAFKA_VERSION").unwrap_or_else(|_| "4.4.0".to_owned());
    let home = cache.join(format!("kafka-{version}"));
    let libs = home.join("libs");
    assert!(
        home.join(".complete").exists() && libs.is_dir(),
        "this test starts its own broker from the Kafka jars in {}; fetch them with \
         `scripts/services up` (KOURIER_CACHE / KOURIER_KAFKA_VERSION as for that script)",
        libs.display()
    );
    let dir = std::env::temp_dir().join(format!(
        "kourier-{name}-broker-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("broker dir");
    let props = dir.join("server.properties");
    std::fs::write(
        &props,
        format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}\n\
             listeners=PLAINTEXT://127.0.0.1:{listen_port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://{advertised}\n\
             inter.broker.listener.name=PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             {settings}",
            dir.join("data").display()
        ),
    )
    .expect("write server.properties");
    let classpath = format!("{}/*", libs.display());
    let log4j = format!(
        "-Dlog4j2.configurationFile={}",
        home.join("log4j2-broker.properties").display()
    );
    let format = Command::new("java")
        .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
        .arg(&log4j)
        .args([
            "-cp",
            &classpath,
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
        ])
        // `--cluster-id=<id>`: an id may start with `-`, which `-t <id>` takes for an option.
        .arg(format!("--cluster-id={}", cluster_id()))
        .arg("-c")
        .arg(&props)
        .output()
        .unwrap_or_else(|e| {
            panic!("run java (Java 17 is needed, `scripts/services up` installs it): {e}")
        });
    assert!(
        format.status.success(),
        "kafka storage format failed: {}{}",
        String::from_utf8_lossy(&format.stdout),
        String::from_utf8_lossy(&format.stderr)
    );
    Prepared {
        dir,
        props,
        classpath,
        log4j,
    }
}

/// A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.
fn cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
        }
    }
    if n > 0 {
        out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}

/// Whether a broker at `bootstrap` answers a metadata request (within about 2 s) with at
/// least one broker, asked with the client settings `config`: the readiness probe of the
/// tests that start a broker of their own.
pub(crate) async fn answers(
    bootstrap: &str,
    config: fn(&str) -> kourier::rdkafka::ClientConfig,
) -> bool {
    use kourier::rdkafka::consumer::{BaseConsumer, Consumer};
    let servers = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config(&servers).create().ok()?;
        let m = consumer
            .fetch_metadata(None, std::time::Duration::from_secs(2))
            .ok()?;
        Some(!m.brokers().is_empty())
    })
    .await
    .unwrap()
    .unwrap_or(false)
}
