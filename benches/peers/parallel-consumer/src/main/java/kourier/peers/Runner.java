package kourier.peers;

import io.confluent.parallelconsumer.PCRetriableException;
import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicLongArray;
import java.util.concurrent.atomic.AtomicReference;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import redis.clients.jedis.JedisPooled;
import redis.clients.jedis.params.SetParams;

/**
 * Confluent Parallel Consumer 0.5.3.3 on the peers benchmark's job (see scripts/peers), the
 * same job and counting as the Rust runners (benches/peers/rust/src/lib.rs): ProcessingOrder.KEY,
 * maxConcurrency 64, failed records retried after 500 ms (PC retries for ever; a permanent
 * failure is written to {@code <topic>.dlt} by the handler, acknowledged, as PC has no
 * dead-letter topic of its own), and in scenario {@code redis} a {@code SET NX EX} per event id
 * in the handler. The handler runs on PC's own thread pool, so the 10 ms of work is a
 * Thread.sleep there. Prints one JSON result line.
 *
 * <p>usage: Runner --bootstrap B --redis-url R --topic T --group G --records N --scenario S
 */
public final class Runner {
  static final int MAX_IN_FLIGHT = 64;
  static final Duration WORK = Duration.ofMillis(10);
  static final Duration RETRY_BACKOFF = Duration.ofMillis(500);
  static final long DEDUP_TTL_SECS = 6 * 3600;
  static final Duration STALL = Duration.ofSeconds(60);
  static final Pattern SEQ = Pattern.compile("\"seq\":(\\d+)");
  static final Pattern ID = Pattern.compile("\"id\":\"([^\"]*)\"");

  enum Fate {
    SUCCEEDS,
    PERMANENT,
    TRANSIENT_ONCE
  }

  /** As fate() in lib.rs: a hash of seq, so that no user has all its records fail. */
  static Fate fate(String scenario, long seq) {
    if (!scenario.equals("failures")) {
      return Fate.SUCCEEDS;
    }
    long h = Long.remainderUnsigned((seq * 0x9E3779B97F4A7C15L) >>> 40, 100);
    if (h == 0) {
      return Fate.PERMANENT;
    }
    return h <= 5 ? Fate.TRANSIENT_ONCE : Fate.SUCCEEDS;
  }

  static final class Bits {
    final AtomicLongArray words;

    Bits(long n) {
      words = new AtomicLongArray((int) ((n + 63) / 64));
    }

    /** Sets the bit; true when it was clear. */
    boolean set(long i) {
      int w = (int) (i / 64);
      if (w >= words.length()) {
        return false;
      }
      long bit = 1L << (i % 64);
      return (words.getAndAccumulate(w, bit, (a, b) -> a | b) & bit) == 0;
    }

    boolean get(long i) {
      int w = (int) (i / 64);
      return w < words.length() && (words.get(w) & (1L << (i % 64))) != 0;
    }
  }

  public static void main(String[] argv) throws Exception {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i + 1 < argv.length; i += 2) {
      args.put(argv[i].replaceFirst("^--", ""), argv[i + 1]);
    }
    String bootstrap = args.get("bootstrap");
    String topic = args.get("topic");
    String group = args.get("group");
    String scenario = args.get("scenario");
    String dlt = topic + ".dlt";
    long records = Long.parseLong(args.get("records"));
    java.net.URI redisUri = java.net.URI.create(args.getOrDefault("redis-url", "redis://127.0.0.1:6379/"));

    Bits handled = new Bits(records);
    Bits attempted = new Bits(records);
    AtomicLong handledCount = new AtomicLong();
    AtomicLong duplicates = new AtomicLong();
    AtomicReference<Long> first = new AtomicReference<>();
    long expectedDlt = 0;
    for (long s = 0; s < records; s++) {
      if (fate(scenario, s) == Fate.PERMANENT) {
        expectedDlt++;
      }
    }

    JedisPooled redis =
        scenario.equals("redis") ? new JedisPooled(redisUri.getHost(), redisUri.getPort()) : null;
    KafkaConsumer<String, String> dltReader = new KafkaConsumer<>(plain(bootstrap, null));

    double cpu0 = cpuSecs();
    Properties cp = plain(bootstrap, group);
    cp.put("enable.auto.commit", "false");
    cp.put("auto.offset.reset", "earliest");
    KafkaConsumer<String, String> consumer = new KafkaConsumer<>(cp);
    Properties pp = new Properties();
    pp.put("bootstrap.servers", bootstrap);
    pp.put("key.serializer", StringSerializer.class.getName());
    pp.put("value.serializer", StringSerializer.class.getName());
    pp.put("enable.idempotence", "true");
    pp.put("acks", "all");
    KafkaProducer<String, String> dltProducer = new KafkaProducer<>(pp);

    ParallelConsumerOptions<String, String> options =
        ParallelConsumerOptions.<String, String>builder()
            .ordering(ProcessingOrder.KEY)
            .maxConcurrency(MAX_IN_FLIGHT)
            .defaultMessageRetryDelay(RETRY_BACKOFF)
            .consumer(consumer)
            .build();
    ParallelStreamProcessor<String, String> pc =
        ParallelStreamProcessor.createEosStreamProcessor(options);
    pc.subscribe(List.of(topic));
    pc.poll(
        ctx -> {
          ConsumerRecord<String, String> r = ctx.getSingleConsumerRecord();
          first.compareAndSet(null, System.nanoTime());
          Matcher m = SEQ.matcher(r.value());
          if (!m.find()) {
            throw new IllegalStateException("record without seq at offset " + r.offset());
          }
          long seq = Long.parseLong(m.group(1));
          boolean firstAttempt = attempted.set(seq);
          if (redis != null) {
            Matcher id = ID.matcher(r.value());
            String eventId = id.find() ? id.group(1) : "";
            String ok =
                redis.set(
                    "peers:" + topic + ":" + eventId,
                    "1",
                    SetParams.setParams().nx().ex(DEDUP_TTL_SECS));
            if (ok == null) {
              return; // a duplicate: handled before
            }
          }
          if (scenario.equals("work")) {
            try {
              Thread.sleep(WORK.toMillis());
            } catch (InterruptedException e) {
              Thread.currentThread().interrupt();
              throw new PCRetriableException("interrupted");
            }
          }
          Fate f = fate(scenario, seq);
          if (f == Fate.PERMANENT) {
            try {
              dltProducer
                  .send(new ProducerRecord<>(dlt, r.partition(), r.key(), r.value(), r.headers()))
                  .get();
            } catch (Exception e) {
              throw new PCRetriableException("dead letter not acknowledged", e);
            }
            return;
          }
          if (f == Fate.TRANSIENT_ONCE && firstAttempt) {
            throw new PCRetriableException("peers: transient failure");
          }
          if (handled.set(seq)) {
            handledCount.incrementAndGet();
          } else {
            duplicates.incrementAndGet();
          }
        });

    // Wait until every record is settled, as wait_settled in lib.rs.
    long toHandle = records - expectedDlt;
    long last = -1;
    long lastChange = System.nanoTime();
    Long end = null;
    while (true) {
      Thread.sleep(5);
      long h = handledCount.get();
      if (h != last) {
        last = h;
        lastChange = System.nanoTime();
      }
      if (h >= toHandle) {
        long count = expectedDlt == 0 ? 0 : dltCount(dltReader, dlt);
        if (count >= expectedDlt) {
          end = System.nanoTime();
          break;
        }
      }
      if (System.nanoTime() - lastChange > STALL.toNanos()) {
        break;
      }
    }
    double cpu = cpuSecs() - cpu0;
    double rss = peakRssMib();
    pc.close();
    dltProducer.close();

    Set<Long> dead = dltSeqs(dltReader, dlt);
    long settled = 0;
    for (long s = 0; s < records; s++) {
      if (handled.get(s) || dead.contains(s)) {
        settled++;
      }
    }
    Long f0 = first.get();
    double secs = (f0 != null && end != null) ? (end - f0) / 1e9 : Double.NaN;
    String rate = Double.isNaN(secs) ? "null" : String.valueOf(records / secs);
    System.out.printf(
        "{\"peer\":\"parallel-consumer\",\"scenario\":\"%s\",\"records\":%d,\"secs\":%s,"
            + "\"rate\":%s,\"cpu_secs\":%s,\"peak_rss_mib\":%s,\"handled\":%d,"
            + "\"dead_lettered\":%d,\"lost\":%d,\"duplicates\":%d,\"stalled\":%b}%n",
        scenario,
        records,
        Double.isNaN(secs) ? "null" : String.valueOf(secs),
        rate,
        cpu,
        rss,
        handledCount.get(),
        dead.size(),
        records - settled,
        duplicates.get(),
        end == null);
    System.out.flush();
    dltReader.close();
    if (redis != null) {
      redis.close();
    }
    System.exit(0);
  }

  static Properties plain(String bootstrap, String group) {
    Properties p = new Properties();
    p.put("bootstrap.servers", bootstrap);
    if (group != null) {
      p.put("group.id", group);
    }
    p.put("key.deserializer", StringDeserializer.class.getName());
    p.put("value.deserializer", StringDeserializer.class.getName());
    return p;
  }

  static List<TopicPartition> partitions(KafkaConsumer<String, String> c, String topic) {
    List<TopicPartition> tps = new ArrayList<>();
    for (PartitionInfo p : c.partitionsFor(topic)) {
      tps.add(new TopicPartition(topic, p.partition()));
    }
    return tps;
  }

  static long dltCount(KafkaConsumer<String, String> c, String topic) {
    List<TopicPartition> tps = partitions(c, topic);
    Map<TopicPartition, Long> begin = c.beginningOffsets(tps);
    long sum = 0;
    for (Map.Entry<TopicPartition, Long> e : c.endOffsets(tps).entrySet()) {
      sum += e.getValue() - begin.get(e.getKey());
    }
    return sum;
  }

  static Set<Long> dltSeqs(KafkaConsumer<String, String> c, String topic) {
    List<TopicPartition> tps = partitions(c, topic);
    Map<TopicPartition, Long> ends = new HashMap<>(c.endOffsets(tps));
    c.assign(tps);
    c.seekToBeginning(tps);
    Set<Long> seqs = new HashSet<>();
    long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
    ends.entrySet().removeIf(e -> c.position(e.getKey()) >= e.getValue());
    while (!ends.isEmpty() && System.nanoTime() < deadline) {
      for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
        Matcher m = SEQ.matcher(r.value());
        if (m.find()) {
          seqs.add(Long.parseLong(m.group(1)));
        }
      }
      ends.entrySet().removeIf(e -> c.position(e.getKey()) >= e.getValue());
    }
    return seqs;
  }

  /** user + system CPU seconds of this process (/proc/self/stat, USER_HZ 100). */
  static double cpuSecs() throws Exception {
    String stat = Files.readString(Path.of("/proc/self/stat"), StandardCharsets.US_ASCII);
    String[] f = stat.substring(stat.lastIndexOf(')') + 2).split(" ");
    return (Long.parseLong(f[11]) + Long.parseLong(f[12])) / 100.0;
  }

  /** Peak resident set (VmHWM), MiB. */
  static double peakRssMib() throws Exception {
    for (String l : Files.readAllLines(Path.of("/proc/self/status"))) {
      if (l.startsWith("VmHWM:")) {
        return Long.parseLong(l.replaceAll("[^0-9]", "")) / 1024.0;
      }
    }
    return 0;
  }
}
