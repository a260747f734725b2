#define _GNU_SOURCE
/* Concurrent gets in C, for scripts/bench-compare's concurrent rows and scripts/faults; the same
 * RESULT line as `mcstore slap` (workload get_concurrent). Keys key:0 .. key:{K-1} are preloaded
 * first (through the same configuration, so with --replicas every key is on its replicas too).
 *
 *   -m libmemcached: N threads, one libmemcached handle (one connection per server) each,
 *                    memcached_get per call: how C services run libmemcached with many threads.
 *   -m floor:        the bare floor for N callers: one thread, one connection, one
 *                    `get k1 .. kN` per round trip (what perfect coalescing of N concurrent
 *                    gets sends), no parsing beyond finding END. Latency per call = the
 *                    batch's round trip. One server only.
 *
 * usage: slap_c -m libmemcached|floor -s host:port[,host:port...] [--callers N] [-n OPS]
 *               [-w get|mixall] [-t SECONDS] [-k KEYS] [-v BYTES] [--distribution modula|ketama] [--binary]
 *               [--replicas N] [--timeout-ms MS] [--failure-limit N] [--retry-timeout S]
 *               [--remove-failed 0|1]
 * Built by scripts/bench-compare and scripts/faults: cc -O2 -pthread benches/slap_c.c -lmemcached
 *
 * -n OPS: calls in total (default 500000); -t SECONDS: run this long instead (with -n too: stop at
 * whichever comes first).
 *
 * -w mixall (workload mixall_concurrent, as `mcstore slap -w mixall`): get, set, delete, touch
 * (TTL 3600) and incr (by 1, of counter ctr:<i>, preloaded with 0) in equal parts, call n of a
 * caller being the (n mod 5)-th of those. A get or delete that finds no item is not a failure
 * (keys are deleted as the run goes), nor a touch of a missing key. The floor sends, per round
 * trip, one text command per caller (caller c's of batch n is the ((n + c) mod 5)-th kind, so
 * each batch mixes them all), closed by `mn`, and reads up to `MN`: error lines are failures.
 *
 * How libmemcached is configured (every behaviour set before the servers are added, as
 * proto-tests/compat/ring_helper.c does, so the continuum and the keys use the same hash):
 *   --distribution ketama  MEMCACHED_BEHAVIOR_KETAMA=1, i.e. MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA
 *                          with the default key hash (one-at-a-time), every server weight 1: the
 *                          same key -> server map as `mcstore --distribution ketama` (src/ring).
 *                          Default: modula (libmemcached's default, as mcstore's).
 *   --binary               MEMCACHED_BEHAVIOR_BINARY_PROTOCOL=1.
 *   --replicas N           MEMCACHED_BEHAVIOR_NUMBER_OF_REPLICAS=N (binary protocol only: refused
 *                          without --binary). libmemcached writes each key to its server and the
 *                          N servers after it in the server list (index + 1 .. + N, not the next
 *                          points of the continuum); a get asks the first of them whose connect
 *                          and write succeed: it moves on to a replica only when that fails, never
 *                          on a read timeout.
 *   --timeout-ms MS        MEMCACHED_BEHAVIOR_POLL_TIMEOUT=MS and CONNECT_TIMEOUT=MS (what bounds
 *                          a call: libmemcached's sockets are non-blocking), and RCV_TIMEOUT /
 *                          SND_TIMEOUT = MS*1000 (those two are in microseconds). Default:
 *                          libmemcached's own (poll 5000 ms, connect 4000 ms).
 * Failure handling, as a libmemcached user sets it for failover (the defaults below; the flags
 * change them):
 *   --failure-limit 2      MEMCACHED_BEHAVIOR_SERVER_FAILURE_LIMIT: a server is marked failed after
 *                          2 failures in a row (libmemcached's default is 5).
 *   --retry-timeout 1      MEMCACHED_BEHAVIOR_RETRY_TIMEOUT: a failed server is tried again after
 *                          1 s (default 2): about the length of the freezes scripts/faults makes.
 *   --remove-failed 1      MEMCACHED_BEHAVIOR_REMOVE_FAILED_SERVERS: a server past the failure
 *                          limit leaves the continuum (its keys go to the next servers) until its
 *                          retry time, instead of failing every call to it fast.
 * Note: libmemcached counts only failed connects towards these (over TCP, a read timeout closes
 * the connection without marking the server). A SIGSTOPped memcached still accepts connections
 * (the kernel completes the handshake), so during a freeze every call to its keys waits out the
 * poll timeout and fails, whatever these settings are.
 *
 * "slap_c: timed run starts" goes to stderr when the timed calls begin (after the preload), for
 * scripts that time a fault from it.
 *
 * A call fails when memcached_get returns no value (an error or a miss) or a value of the wrong
 * size. With failed calls the RESULT line is still printed, then a count of the failures by
 * libmemcached return code on stderr, and the exit status is 1.
 *
 * Latencies go to a log-linear histogram (exact below 2 us, then 1024 steps per power of two:
 * 0.1%, as the 3 significant digits of mcstore slap's hdrhistogram); max is exact.
 */
#include <arpa/inet.h>
#include <libmemcached/memcached.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

/* ---- latency histogram (nanoseconds) ---- */
#define SUB 1024
#define SHIFTS 40
#define NBUCKETS (2 * SUB + SHIFTS * SUB)

typedef struct {
  uint64_t *b;
  uint64_t n, max;
} hist_t;

static void hist_init(hist_t *h) {
  h->b = calloc(NBUCKETS, sizeof(uint64_t));
  if (!h->b) { perror("calloc"); exit(1); }
  h->n = h->max = 0;
}

static size_t bucket_of(uint64_t v) {
  if (v >= (1ULL << (10 + SHIFTS + 1))) v = (1ULL << (10 + SHIFTS + 1)) - 1;
  if (v < 2 * SUB) return (size_t)v;
  int shift = 63 - __builtin_clzll(v) - 10; /* v >> shift is in [SUB, 2 * SUB) */
  return (size_t)(2 * SUB + (size_t)(shift - 1) * SUB + ((v >> shift) - SUB));
}

/* The highest value that falls in bucket i. */
static uint64_t bucket_high(size_t i) {
  if (i < 2 * SUB) return i;
  size_t shift = (i - 2 * SUB) / SUB + 1;
  uint64_t sub = (i - 2 * SUB) % SUB + SUB;
  return ((sub + 1) << shift) - 1;
}

static void hist_add(hist_t *h, double seconds, uint64_t count) {
  uint64_t ns = seconds > 0 ? (uint64_t)(seconds * 1e9) : 0;
  h->b[bucket_of(ns)] += count;
  h->n += count;
  if (ns > h->max) h->max = ns;
}

static void hist_merge(hist_t *into, const hist_t *from) {
  for (size_t i = 0; i < NBUCKETS; i++) into->b[i] += from->b[i];
  into->n += from->n;
  if (from->max > into->max) into->max = from->max;
}

/* Microseconds at quantile q (the bucket's highest value, never above the max). */
static double hist_us(const hist_t *h, double q) {
  if (!h->n) return 0;
  uint64_t target = (uint64_t)(q * (double)h->n + 0.999999);
  if (target < 1) target = 1;
  if (target > h->n) target = h->n;
  uint64_t seen = 0;
  for (size_t i = 0; i < NBUCKETS; i++) {
    seen += h->b[i];
    if (seen >= target) {
      uint64_t v = bucket_high(i);
      return (v > h->max ? h->max : v) / 1e3;
    }
  }
  return h->max / 1e3;
}

/* ---- configuration ---- */
#define MAX_SERVERS 64
static char *hosts[MAX_SERVERS];
static int ports[MAX_SERVERS];
static int nservers;
static int ketama, binary;
static long replicas, timeout_ms, failure_limit = 2, retry_timeout = 1, remove_failed = 1;
static long callers = 64, ops = 500000, keyspace = 10000, bytes = 100;
static int mixall; /* -w mixall */
static double duration; /* seconds; 0: run -n calls */
static pthread_barrier_t barrier;
static double start_at;
static hist_t all;
static long errors_total, done_total;
static long rc_counts[MEMCACHED_MAXIMUM_RETURN + 1]; /* failed calls by return code; last: wrong size */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static long key_index(long c, long n) { return (c * 7919 + n * 31) % keyspace; }

static void set(memcached_st *m, memcached_behavior_t b, uint64_t v) {
  memcached_return_t rc = memcached_behavior_set(m, b, v);
  if (rc != MEMCACHED_SUCCESS) {
    fprintf(stderr, "memcached_behavior_set(%d, %lu): %s\n", (int)b, (unsigned long)v, memcached_strerror(m, rc));
    exit(2);
  }
}

static memcached_st *handle(void) {
  memcached_st *m = memcached_create(NULL);
  set(m, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
  if (ketama) set(m, MEMCACHED_BEHAVIOR_KETAMA, 1);
  if (binary) set(m, MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, 1);
  if (replicas) set(m, MEMCACHED_BEHAVIOR_NUMBER_OF_REPLICAS, (uint64_t)replicas);
  if (timeout_ms) {
    set(m, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, (uint64_t)timeout_ms);
    set(m, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, (uint64_t)timeout_ms);
    set(m, MEMCACHED_BEHAVIOR_RCV_TIMEOUT, (uint64_t)timeout_ms * 1000);
    set(m, MEMCACHED_BEHAVIOR_SND_TIMEOUT, (uint64_t)timeout_ms * 1000);
  }
  set(m, MEMCACHED_BEHAVIOR_SERVER_FAILURE_LIMIT, (uint64_t)failure_limit);
  set(m, MEMCACHED_BEHAVIOR_RETRY_TIMEOUT, (uint64_t)retry_timeout);
  set(m, MEMCACHED_BEHAVIOR_REMOVE_FAILED_SERVERS, (uint64_t)remove_failed);
  for (int i = 0; i < nservers; i++) {
    memcached_return_t rc = memcached_server_add_with_weight(m, hosts[i], (in_port_t)ports[i], 1);
    if (rc != MEMCACHED_SUCCESS) {
      fprintf(stderr, "server_add %s:%d: %s\n", hosts[i], ports[i], memcached_strerror(m, rc));
      exit(2);
    }
  }
  return m;
}

static long share(long c) { return ops / callers + (c < ops % callers); }

static void *caller(void *arg) {
  long c = (long)arg, n_ops = share(c), errors = 0, n = 0;
  long rcs[MEMCACHED_MAXIMUM_RETURN + 1] = {0};
  hist_t h;
  hist_init(&h);
  memcached_st *m = handle();
  char key[32];
  size_t len; uint32_t flags; memcached_return_t rc;
  for (int i = 0; i < 16 && i < keyspace; i++) { /* connect (to most servers), untimed */
    int kl = snprintf(key, sizeof key, "key:%d", i);
    free(memcached_get(m, key, (size_t)kl, &len, &flags, &rc));
  }
  pthread_barrier_wait(&barrier);
  double deadline = duration > 0 ? start_at + duration : 0;
  char *value = malloc((size_t)bytes); memset(value, 'v', (size_t)bytes);
  char ctr[32];
  for (; n < n_ops; n++) {
    long i = key_index(c, n);
    int kl = snprintf(key, sizeof key, "key:%ld", i);
    double t0 = now();
    if (deadline && t0 >= deadline) break;
    if (mixall && n % 5) {
      uint64_t counter;
      switch (n % 5) {
      case 1: rc = memcached_set(m, key, (size_t)kl, value, (size_t)bytes, 0, 0); break;
      case 2: rc = memcached_delete(m, key, (size_t)kl, 0); break;
      case 3: rc = memcached_touch(m, key, (size_t)kl, 3600); break;
      default: {
        int cl = snprintf(ctr, sizeof ctr, "ctr:%ld", i);
        rc = memcached_increment(m, ctr, (size_t)cl, 1, &counter);
      }
      }
      hist_add(&h, now() - t0, 1);
      if (rc != MEMCACHED_SUCCESS && rc != MEMCACHED_NOTFOUND && rc != MEMCACHED_DELETED) {
        errors++; rcs[rc < MEMCACHED_MAXIMUM_RETURN ? rc : MEMCACHED_FAILURE]++;
      }
      continue;
    }
    char *v = memcached_get(m, key, (size_t)kl, &len, &flags, &rc);
    hist_add(&h, now() - t0, 1);
    if (!v) {
      if (!(mixall && rc == MEMCACHED_NOTFOUND)) { errors++; rcs[rc < MEMCACHED_MAXIMUM_RETURN ? rc : MEMCACHED_FAILURE]++; }
    }
    else if (len != (size_t)bytes) { errors++; rcs[MEMCACHED_MAXIMUM_RETURN]++; }
    free(v);
  }
  free(value);
  memcached_free(m);
  pthread_mutex_lock(&lock);
  errors_total += errors; done_total += n;
  for (int i = 0; i <= MEMCACHED_MAXIMUM_RETURN; i++) rc_counts[i] += rcs[i];
  hist_merge(&all, &h);
  pthread_mutex_unlock(&lock);
  free(h.b);
  return NULL;
}

/* The floor: one connection, batches of `callers` keys per multi-get. */
static int fd;
static char *rbuf;
static size_t rcap = 1 << 20;

static void send_all(const char *p, size_t n) {
  while (n) {
    ssize_t w = send(fd, p, n, 0);
    if (w <= 0) { perror("send"); exit(1); }
    p += w; n -= (size_t)w;
  }
}

/* Reads until the reply ends with `end` (END for a multi-get, MN for a mixed batch). */
static size_t recv_until(const char *end) {
  size_t len = 0, el = strlen(end);
  for (;;) {
    ssize_t r = recv(fd, rbuf + len, rcap - len, 0);
    if (r <= 0) { perror("recv"); exit(1); }
    len += (size_t)r;
    if (len >= el && memcmp(rbuf + len - el, end, el) == 0) return len;
    if (len == rcap) { rcap *= 2; rbuf = realloc(rbuf, rcap); }
  }
}

/* The floor for -w mixall: per round trip one text command per caller, every kind in each
 * batch, closed by `mn`; error lines count as failures. */
static size_t mixall_batch(char *req, long batch, long n) {
  size_t w = 0;
  for (long c = 0; c < batch; c++) {
    long i = key_index(c, n);
    switch ((n + c) % 5) {
    case 0: w += (size_t)sprintf(req + w, "get key:%ld\r\n", i); break;
    case 1:
      w += (size_t)sprintf(req + w, "set key:%ld 0 0 %ld\r\n", i, bytes);
      memset(req + w, 'v', (size_t)bytes); w += (size_t)bytes;
      w += (size_t)sprintf(req + w, "\r\n");
      break;
    case 2: w += (size_t)sprintf(req + w, "delete key:%ld\r\n", i); break;
    case 3: w += (size_t)sprintf(req + w, "touch key:%ld 3600\r\n", i); break;
    default: w += (size_t)sprintf(req + w, "incr ctr:%ld 1\r\n", i); break;
    }
  }
  return w + (size_t)sprintf(req + w, "mn\r\n");
}

static void floor_run(void) {
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET; sa.sin_port = htons((uint16_t)ports[0]); inet_pton(AF_INET, hosts[0], &sa.sin_addr);
  fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); exit(1); }
  rbuf = malloc(rcap);
  char *req = malloc((size_t)callers * (64 + (size_t)bytes) + 16);
  long done = 0, n = 0;
  double deadline = duration > 0 ? now() + duration : 0;
  while (done < ops && !(deadline && now() >= deadline)) {
    long batch = ops - done < callers ? ops - done : callers;
    size_t w;
    if (mixall) {
      w = mixall_batch(req, batch, n);
      double t0 = now();
      send_all(req, w);
      size_t got = recv_until("MN\r\n");
      hist_add(&all, now() - t0, (uint64_t)batch);
      for (char *p = rbuf; (p = memmem(p, (size_t)(rbuf + got - p), "ERROR", 5)); p += 5) errors_total++;
      done += batch; n++;
      continue;
    }
    w = (size_t)sprintf(req, "get");
    for (long c = 0; c < batch; c++) w += (size_t)sprintf(req + w, " key:%ld", key_index(c, n));
    w += (size_t)sprintf(req + w, "\r\n");
    double t0 = now();
    send_all(req, w);
    size_t got = recv_until("END\r\n");
    double t = now() - t0;
    /* Each hit is "VALUE key:N 0 BYTES\r\n" + value + "\r\n": count the VALUE lines. */
    long hits = 0;
    for (char *p = rbuf; (p = memmem(p, (size_t)(rbuf + got - p), "VALUE ", 6)); p += 6) hits++;
    if (hits != batch) errors_total += batch - hits;
    hist_add(&all, t, (uint64_t)batch);
    done += batch; n++;
  }
  done_total = done;
}

/* Parses "host:port,host:port,...". */
static int parse_servers(const char *list) {
  char *copy = strdup(list), *save = NULL;
  for (char *s = strtok_r(copy, ",", &save); s; s = strtok_r(NULL, ",", &save)) {
    char *colon = strrchr(s, ':');
    if (!colon || nservers == MAX_SERVERS) return -1;
    *colon = 0;
    hosts[nservers] = s;
    ports[nservers] = atoi(colon + 1);
    if (ports[nservers] <= 0) return -1;
    nservers++;
  }
  return nservers ? 0 : -1;
}

static int usage(const char *why) {
  fprintf(stderr, "%s\nusage: slap_c -m libmemcached|floor -s host:port[,host:port...] [--callers N] [-n OPS] [-w get|mixall] "
                  "[-t SECONDS] [-k KEYS] [-v BYTES] [--distribution modula|ketama] [--binary] [--replicas N] "
                  "[--timeout-ms MS] [--failure-limit N] [--retry-timeout S] [--remove-failed 0|1]\n", why);
  return 2;
}

int main(int argc, char **argv) {
  const char *mode = "libmemcached", *server = "127.0.0.1:11211", *dist = "modula";
  int ops_given = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--binary")) { binary = 1; continue; }
    if (i + 1 >= argc) return usage("a value is missing");
    const char *v = argv[++i];
    if (!strcmp(a, "-m")) mode = v;
    else if (!strcmp(a, "-s")) server = v;
    else if (!strcmp(a, "--callers")) callers = atol(v);
    else if (!strcmp(a, "-n")) { ops = atol(v); ops_given = 1; }
    else if (!strcmp(a, "-t")) duration = atof(v);
    else if (!strcmp(a, "-w")) {
      if (!strcmp(v, "mixall")) mixall = 1;
      else if (strcmp(v, "get")) return usage("-w is get or mixall");
    }
    else if (!strcmp(a, "-k")) keyspace = atol(v);
    else if (!strcmp(a, "-v")) bytes = atol(v);
    else if (!strcmp(a, "--distribution")) dist = v;
    else if (!strcmp(a, "--replicas")) replicas = atol(v);
    else if (!strcmp(a, "--timeout-ms")) timeout_ms = atol(v);
    else if (!strcmp(a, "--failure-limit")) failure_limit = atol(v);
    else if (!strcmp(a, "--retry-timeout")) retry_timeout = atol(v);
    else if (!strcmp(a, "--remove-failed")) remove_failed = atol(v);
    else { fprintf(stderr, "unknown argument %s\n", a); return 2; }
  }
  if (parse_servers(server)) return usage("-s takes host:port[,host:port...]");
  if (callers < 1 || keyspace < 1 || ops < 1) return usage("--callers, -k and -n must be at least 1");
  if (!strcmp(dist, "ketama")) ketama = 1;
  else if (strcmp(dist, "modula")) return usage("--distribution is modula or ketama");
  if (replicas < 0 || timeout_ms < 0 || failure_limit < 1 || retry_timeout < 0 || duration < 0)
    return usage("--replicas, --timeout-ms, --retry-timeout, -t must be >= 0, --failure-limit >= 1");
  if (replicas && !binary) return usage("--replicas needs --binary (libmemcached replicates over the binary protocol only)");
  if (replicas >= nservers) return usage("--replicas must be below the number of servers");
  if (duration > 0 && !ops_given) ops = LONG_MAX;
  int floor_mode = !strcmp(mode, "floor");
  if (!floor_mode && strcmp(mode, "libmemcached")) return usage("-m is libmemcached or floor");
  if (floor_mode && (nservers != 1 || binary || replicas))
    return usage("-m floor speaks text to one server");
  hist_init(&all);

  /* Preload, untimed. */
  memcached_st *m = handle();
  char *value = malloc((size_t)bytes); memset(value, 'v', (size_t)bytes);
  char key[32];
  for (long i = 0; i < keyspace; i++) {
    int kl = snprintf(key, sizeof key, "key:%ld", i);
    memcached_return_t rc = memcached_set(m, key, (size_t)kl, value, (size_t)bytes, 0, 0);
    if (rc != MEMCACHED_SUCCESS) {
      fprintf(stderr, "preload failed: %s\n", memcached_strerror(m, rc)); return 1;
    }
  }
  for (long i = 0; mixall && i < keyspace; i++) {
    int kl = snprintf(key, sizeof key, "ctr:%ld", i);
    memcached_return_t rc = memcached_set(m, key, (size_t)kl, "0", 1, 0, 0);
    if (rc != MEMCACHED_SUCCESS) {
      fprintf(stderr, "preload failed: %s\n", memcached_strerror(m, rc)); return 1;
    }
  }
  memcached_free(m);

  double c0, t0, wall;
  const char *client;
  if (floor_mode) {
    client = "floor";
    fprintf(stderr, "slap_c: timed run starts\n");
    c0 = cpu(); t0 = now();
    floor_run();
    wall = now() - t0;
  } else {
    client = "libmemcached";
    pthread_barrier_init(&barrier, NULL, (unsigned)callers + 1);
    pthread_t *t = malloc(sizeof(pthread_t) * (size_t)callers);
    for (long c = 0; c < callers; c++) pthread_create(&t[c], NULL, caller, (void *)c);
    c0 = cpu(); t0 = now();
    start_at = t0;
    /* scripts/faults times its faults from this line. */
    fprintf(stderr, "slap_c: timed run starts\n");
    pthread_barrier_wait(&barrier);
    for (long c = 0; c < callers; c++) pthread_join(t[c], NULL);
    wall = now() - t0;
  }
  double used = cpu() - c0;
  long done = done_total > 0 ? done_total : 1;
  /* Fields are only ever added (at the end), never renamed or removed: scripts read them. */
  printf("RESULT client=%s proto=%s workload=%s callers=%ld ops=%ld wall_s=%.6f "
         "ops_per_s=%.1f cpu_us_per_op=%.4f p50_us=%.1f p99_us=%.1f errors=%ld p999_us=%.1f "
         "max_us=%.1f failed=%ld\n",
         client, binary ? "binary" : "text", mixall ? "mixall_concurrent" : "get_concurrent",
         callers, done_total, wall, done_total / wall,
         used * 1e6 / done, hist_us(&all, 0.5), hist_us(&all, 0.99), errors_total,
         hist_us(&all, 0.999), all.max / 1e3, errors_total);
  fflush(stdout);
  if (errors_total) {
    fprintf(stderr, "%ld calls failed", errors_total);
    const char *sep = ":";
    for (int i = 0; i < MEMCACHED_MAXIMUM_RETURN; i++)
      if (rc_counts[i]) {
        fprintf(stderr, "%s %s %ld", sep, memcached_strerror(NULL, (memcached_return_t)i), rc_counts[i]);
        sep = ",";
      }
    if (rc_counts[MEMCACHED_MAXIMUM_RETURN])
      fprintf(stderr, "%s wrong size %ld", sep, rc_counts[MEMCACHED_MAXIMUM_RETURN]);
    fprintf(stderr, "\n");
    return 1;
  }
  return 0;
}
