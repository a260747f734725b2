#define _GNU_SOURCE
/* Concurrent gets in C, for scripts/bench-compare's concurrent rows; the same RESULT line as
 * `mcstore slap` (workload get_concurrent). Keys key:0 .. key:{K-1} are preloaded first.
 *
 *   -m libmemcached: N threads, one libmemcached handle (one connection) each, memcached_get
 *                    per call: how C services run libmemcached with many threads.
 *   -m floor:        the bare floor for N callers: one thread, one connection, one
 *                    `get k1 .. kN` per round trip (what perfect coalescing of N concurrent
 *                    gets sends), no parsing beyond finding END. Latency per call = the
 *                    batch's round trip.
 *
 * usage: slap_c -m libmemcached|floor -s host:port [--callers N] [-n OPS] [-k KEYS] [-v BYTES]
 * Built by scripts/bench-compare: cc -O2 -pthread benches/slap_c.c -lmemcached
 */
#include <arpa/inet.h>
#include <libmemcached/memcached.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
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

static const char *host = "127.0.0.1";
static int port = 11211;
static long callers = 64, ops = 500000, keyspace = 10000, bytes = 100;
static pthread_barrier_t barrier;
static double *lat; /* latency of every call, seconds */

static long key_index(long c, long n) { return (c * 7919 + n * 31) % keyspace; }

static memcached_st *handle(void) {
  memcached_st *m = memcached_create(NULL);
  memcached_server_add(m, host, (in_port_t)port);
  memcached_behavior_set(m, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
  return m;
}

static long share(long c) { return ops / callers + (c < ops % callers); }
static long first_of(long c) { long f = 0; for (long i = 0; i < c; i++) f += share(i); return f; }
static long errors_total;
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;

static void *caller(void *arg) {
  long c = (long)arg, n_ops = share(c), at = first_of(c), errors = 0;
  memcached_st *m = handle();
  char key[32];
  size_t len; uint32_t flags; memcached_return_t rc;
  free(memcached_get(m, "key:0", 5, &len, &flags, &rc)); /* connect */
  pthread_barrier_wait(&barrier);
  for (long n = 0; n < n_ops; n++) {
    int kl = snprintf(key, sizeof key, "key:%ld", key_index(c, n));
    double t0 = now();
    char *v = memcached_get(m, key, (size_t)kl, &len, &flags, &rc);
    lat[at + n] = now() - t0;
    if (!v || len != (size_t)bytes) errors++;
    free(v);
  }
  memcached_free(m);
  pthread_mutex_lock(&err_lock); errors_total += errors; pthread_mutex_unlock(&err_lock);
  return NULL;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
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

static size_t recv_until_end(void) {
  size_t len = 0;
  for (;;) {
    ssize_t r = recv(fd, rbuf + len, rcap - len, 0);
    if (r <= 0) { perror("recv"); exit(1); }
    len += (size_t)r;
    if (len >= 5 && memcmp(rbuf + len - 5, "END\r\n", 5) == 0) return len;
    if (len == rcap) { rcap *= 2; rbuf = realloc(rbuf, rcap); }
  }
}

static void floor_run(void) {
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET; sa.sin_port = htons((uint16_t)port); inet_pton(AF_INET, host, &sa.sin_addr);
  fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); exit(1); }
  rbuf = malloc(rcap);
  char *req = malloc((size_t)callers * 24 + 16);
  long done = 0, n = 0;
  while (done < ops) {
    long batch = ops - done < callers ? ops - done : callers;
    size_t w = (size_t)sprintf(req, "get");
    for (long c = 0; c < batch; c++) w += (size_t)sprintf(req + w, " key:%ld", key_index(c, n));
    w += (size_t)sprintf(req + w, "\r\n");
    double t0 = now();
    send_all(req, w);
    size_t got = recv_until_end();
    double t = now() - t0;
    /* Each hit is "VALUE key:N 0 BYTES\r\n" + value + "\r\n": count the VALUE lines. */
    long hits = 0;
    for (char *p = rbuf; (p = memmem(p, (size_t)(rbuf + got - p), "VALUE ", 6)); p += 6) hits++;
    if (hits != batch) errors_total += batch - hits;
    for (long c = 0; c < batch; c++) lat[done + c] = t;
    done += batch; n++;
  }
}

int main(int argc, char **argv) {
  const char *mode = "libmemcached", *server = "127.0.0.1:11211";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "-m")) mode = argv[i + 1];
    else if (!strcmp(argv[i], "-s")) server = argv[i + 1];
    else if (!strcmp(argv[i], "--callers")) callers = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-n")) ops = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-k")) keyspace = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "-v")) bytes = atol(argv[i + 1]);
    else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
  }
  static char hostbuf[256];
  snprintf(hostbuf, sizeof hostbuf, "%s", server);
  char *colon = strrchr(hostbuf, ':');
  if (!colon || callers < 1) { fprintf(stderr, "-s host:port and --callers >= 1\n"); return 2; }
  *colon = 0; host = hostbuf; port = atoi(colon + 1);
  lat = malloc(sizeof(double) * (size_t)ops);

  /* Preload, untimed. */
  memcached_st *m = handle();
  char *value = malloc((size_t)bytes); memset(value, 'v', (size_t)bytes);
  char key[32];
  for (long i = 0; i < keyspace; i++) {
    int kl = snprintf(key, sizeof key, "key:%ld", i);
    if (memcached_set(m, key, (size_t)kl, value, (size_t)bytes, 0, 0) != MEMCACHED_SUCCESS) {
      fprintf(stderr, "preload failed\n"); return 1;
    }
  }
  memcached_free(m);

  double c0, t0, wall;
  const char *client;
  if (!strcmp(mode, "floor")) {
    client = "floor";
    c0 = cpu(); t0 = now();
    floor_run();
    wall = now() - t0;
  } else {
    client = "libmemcached";
    pthread_barrier_init(&barrier, NULL, (unsigned)callers + 1);
    pthread_t *t = malloc(sizeof(pthread_t) * (size_t)callers);
    for (long c = 0; c < callers; c++) pthread_create(&t[c], NULL, caller, (void *)c);
    pthread_barrier_wait(&barrier);
    c0 = cpu(); t0 = now();
    for (long c = 0; c < callers; c++) pthread_join(t[c], NULL);
    wall = now() - t0;
  }
  double used = cpu() - c0;
  qsort(lat, (size_t)ops, sizeof(double), cmp);
  if (errors_total) { fprintf(stderr, "%ld calls failed\n", errors_total); return 1; }
  printf("RESULT client=%s proto=text workload=get_concurrent callers=%ld ops=%ld wall_s=%.6f "
         "ops_per_s=%.1f cpu_us_per_op=%.4f p50_us=%.1f p99_us=%.1f\n",
         client, callers, ops, wall, ops / wall, used * 1e6 / ops,
         lat[(long)((ops - 1) * 0.5)] * 1e6, lat[(long)((ops - 1) * 0.99)] * 1e6);
  return 0;
}
