/* The floor: the bench workloads with no client library at all. One blocking socket per
 * server, TCP_NODELAY, one send and recv(s) until the reply's end marker per request, no
 * parsing beyond finding that marker. Same RESULT line as mcstore bench. Text protocol, one
 * server.
 *
 * usage: floor_bench -s host:port -w WORKLOAD [-n OPS] [-k KEYS] [-v BYTES]
 * Built by scripts/bench-compare: cc -O2 benches/floor_bench.c
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

static void cpu(double *user, double *sys) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  *user = r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6;
  *sys = r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static int fd;
static char *rbuf;
static size_t rcap;

static void send_all(const char *p, size_t n) {
  while (n) {
    ssize_t w = send(fd, p, n, 0);
    if (w <= 0) { perror("send"); exit(1); }
    p += w; n -= (size_t)w;
  }
}

/* Reads until the buffer ends with `end`; returns the reply length. */
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

int main(int argc, char **argv) {
  const char *server = "127.0.0.1:11211", *workload = NULL;
  long ops = -1, keyspace = -1, bytes = -1;
  int opt;
  while ((opt = getopt(argc, argv, "s:w:bn:k:v:")) != -1) {
    switch (opt) {
      case 's': server = optarg; break;
      case 'w': workload = optarg; break;
      case 'b': fprintf(stderr, "the floor client speaks text only\n"); return 2;
      case 'n': ops = atol(optarg); break;
      case 'k': keyspace = atol(optarg); break;
      case 'v': bytes = atol(optarg); break;
      default: return 2;
    }
  }
  if (!workload || strchr(server, ',')) { fprintf(stderr, "one server and -w are required\n"); return 2; }
  long d_ops = 200000, d_keys = 10000, d_bytes = 100;
  if (!strcmp(workload, "set_noreply")) d_ops = 1000000;
  else if (!strcmp(workload, "mget100")) d_ops = 10000;
  else if (!strcmp(workload, "large_get")) { d_ops = 20000; d_keys = 100; d_bytes = 100 * 1024; }
  if (ops < 0) ops = d_ops;
  if (keyspace < 0) keyspace = d_keys;
  if (bytes < 0) bytes = d_bytes;
  if (keyspace < 100) keyspace = 100;

  char host[256];
  const char *colon = strrchr(server, ':');
  snprintf(host, sizeof host, "%.*s", (int)(colon - server), server);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
  inet_pton(AF_INET, host, &sa.sin_addr);
  fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
  rcap = (size_t)bytes * 120 + 65536;
  rbuf = malloc(rcap);

  const char *prefix = !strcmp(workload, "get_miss") ? "bench:miss:" : "bench:key:";
  char **getreq = malloc(sizeof(char *) * keyspace), **setreq = malloc(sizeof(char *) * keyspace);
  size_t *getlen = malloc(sizeof(size_t) * keyspace), *setlen = malloc(sizeof(size_t) * keyspace);
  for (long i = 0; i < keyspace; i++) {
    char head[128];
    int g = snprintf(head, sizeof head, "get %s%ld\r\n", prefix, i);
    getreq[i] = strdup(head);
    getlen[i] = (size_t)g;
    int h = snprintf(head, sizeof head, "set %s%ld 0 0 %ld\r\n", prefix, i, bytes);
    setreq[i] = malloc((size_t)h + bytes + 2);
    memcpy(setreq[i], head, (size_t)h);
    memset(setreq[i] + h, 'v', (size_t)bytes);
    memcpy(setreq[i] + h + bytes, "\r\n", 2);
    setlen[i] = (size_t)h + bytes + 2;
  }
  if (strcmp(workload, "get_miss") && strcmp(workload, "set") && strcmp(workload, "set_noreply"))
    for (long i = 0; i < keyspace; i++) { send_all(setreq[i], setlen[i]); recv_until("\r\n"); }
  /* mget100 requests: 100 consecutive keys per line. */
  long windows = keyspace - 99;
  char *mreq = malloc(64 * 100 + 16);

  long errors = 0, returned = 0;
  double u0, s0, u1, s1;
  cpu(&u0, &s0);
  double t0 = now();
  if (!strcmp(workload, "get") || !strcmp(workload, "large_get") || !strcmp(workload, "get_miss")) {
    int miss = !strcmp(workload, "get_miss");
    for (long i = 0; i < ops; i++) {
      send_all(getreq[i % keyspace], getlen[i % keyspace]);
      size_t n = recv_until("END\r\n");
      if (miss ? n != 5 : n != (size_t)bytes + 5 + 30) {
        /* Exact length check is loose on purpose: header length varies with the key. */
        if (miss || n < (size_t)bytes) errors++;
      }
    }
    returned = ops - errors;
  } else if (!strcmp(workload, "set")) {
    for (long i = 0; i < ops; i++) {
      send_all(setreq[i % keyspace], setlen[i % keyspace]);
      if (recv_until("\r\n") != 8) errors++;
    }
    returned = ops;
  } else if (!strcmp(workload, "set_noreply")) {
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap + 4096 + (size_t)bytes);
    for (long i = 0; i < ops; i++) {
      long k = i % keyspace;
      char head[128];
      int h = snprintf(head, sizeof head, "set %s%ld 0 0 %ld noreply\r\n", prefix, k, bytes);
      memcpy(out + len, head, (size_t)h);
      memset(out + len + h, 'v', (size_t)bytes);
      memcpy(out + len + h + bytes, "\r\n", 2);
      len += (size_t)h + bytes + 2;
      if (len >= cap) { send_all(out, len); len = 0; }
    }
    memcpy(out + len, "version\r\n", 9);
    send_all(out, len + 9);
    recv_until("\r\n");
    returned = ops;
  } else if (!strcmp(workload, "mget100")) {
    for (long i = 0; i < ops; i++) {
      long start = (i * 100) % windows;
      size_t len = 3;
      memcpy(mreq, "get", 3);
      for (long j = start; j < start + 100; j++) {
        size_t kl = getlen[j] - 6;
        mreq[len++] = ' ';
        memcpy(mreq + len, getreq[j] + 4, kl);
        len += kl;
      }
      memcpy(mreq + len, "\r\n", 2);
      send_all(mreq, len + 2);
      recv_until("END\r\n");
      returned += 100;
    }
  } else {
    fprintf(stderr, "unknown workload %s\n", workload);
    return 2;
  }
  double wall = now() - t0;
  cpu(&u1, &s1);
  double cpu_s = (u1 - u0) + (s1 - s0);
  printf("RESULT client=floor/1 proto=text workload=%s servers=1 dist=single ops=%ld keys=%ld "
         "wall_s=%.6f ops_per_s=%.1f keys_per_s=%.1f user_s=%.6f sys_s=%.6f cpu_us_per_op=%.4f "
         "cpu_us_per_key=%.4f errors=%ld\n",
         workload, ops, returned, wall, ops / wall, returned / wall, u1 - u0, s1 - s0,
         cpu_s * 1e6 / ops, cpu_s * 1e6 / (returned ? returned : 1), errors);
  return 0;
}
