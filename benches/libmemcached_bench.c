/* The mcstore bench workloads driven through libmemcached, printing the same RESULT line.
 *
 * usage: libmemcached_bench -s host:port[,host:port...] -w WORKLOAD [-b] [-n OPS] [-k KEYS] [-v BYTES]
 * Built by scripts/bench-compare: cc -O2 benches/libmemcached_bench.c -lmemcached
 *
 * Settings as a tuned libmemcached user would have them: TCP_NODELAY, binary protocol with -b,
 * NOREPLY + BUFFER_REQUESTS for set_noreply, memcached_mget + memcached_fetch_result with a
 * reused result, and the weighted ketama distribution for several servers.
 */
#include <libmemcached/memcached.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

int main(int argc, char **argv) {
  const char *servers = "127.0.0.1:11211", *workload = NULL;
  int binary = 0;
  long ops = -1, keyspace = -1, bytes = -1;
  int opt;
  while ((opt = getopt(argc, argv, "s:w:bn:k:v:")) != -1) {
    switch (opt) {
      case 's': servers = optarg; break;
      case 'w': workload = optarg; break;
      case 'b': binary = 1; break;
      case 'n': ops = atol(optarg); break;
      case 'k': keyspace = atol(optarg); break;
      case 'v': bytes = atol(optarg); break;
      default: fprintf(stderr, "bad arguments\n"); return 2;
    }
  }
  if (!workload) { fprintf(stderr, "-w WORKLOAD is required\n"); return 2; }
  long d_ops = 200000, d_keys = 10000, d_bytes = 100;
  if (!strcmp(workload, "set_noreply")) d_ops = 1000000;
  else if (!strcmp(workload, "mget100")) d_ops = 10000;
  else if (!strcmp(workload, "large_get")) { d_ops = 20000; d_keys = 100; d_bytes = 100 * 1024; }
  else if (strcmp(workload, "get") && strcmp(workload, "get_miss") && strcmp(workload, "set")) {
    fprintf(stderr, "unknown workload %s\n", workload); return 2;
  }
  if (ops < 0) ops = d_ops;
  if (keyspace < 0) keyspace = d_keys;
  if (bytes < 0) bytes = d_bytes;
  if (!strcmp(workload, "mget100") && keyspace < 100) keyspace = 100;

  memcached_st *memc = memcached_create(NULL);
  memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
  if (binary) memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, 1);
  int nservers = 0;
  char *list = strdup(servers);
  for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
    char *colon = strrchr(tok, ':');
    int port = 11211;
    if (colon) { *colon = 0; port = atoi(colon + 1); }
    memcached_server_add(memc, tok, port);
    nservers++;
  }
  if (nservers > 1) memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);

  const char *prefix = !strcmp(workload, "get_miss") ? "bench:miss:" : "bench:key:";
  char **keys = malloc(sizeof(char *) * keyspace);
  size_t *lens = malloc(sizeof(size_t) * keyspace);
  for (long i = 0; i < keyspace; i++) {
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%s%ld", prefix, i);
    keys[i] = strdup(buf);
    lens[i] = (size_t)n;
  }
  char *value = malloc(bytes);
  memset(value, 'v', bytes);

  if (!strcmp(workload, "get") || !strcmp(workload, "mget100") || !strcmp(workload, "large_get")) {
    for (long i = 0; i < keyspace; i++)
      if (memcached_set(memc, keys[i], lens[i], value, bytes, 0, 0) != MEMCACHED_SUCCESS) {
        fprintf(stderr, "setup set failed\n"); return 1;
      }
  }
  if (!strcmp(workload, "get_miss"))
    for (long i = 0; i < keyspace; i++) memcached_delete(memc, keys[i], lens[i], 0);
  /* Warm-up. */
  for (long i = 0; i < 100 && i < keyspace; i++) {
    size_t len; uint32_t flags; memcached_return_t rc;
    char *v = memcached_get(memc, keys[i], lens[i], &len, &flags, &rc);
    free(v);
  }

  long errors = 0, returned = 0;
  double u0, s0, u1, s1;
  cpu(&u0, &s0);
  double t0 = now();
  if (!strcmp(workload, "get") || !strcmp(workload, "large_get")) {
    for (long i = 0; i < ops; i++) {
      size_t len; uint32_t flags; memcached_return_t rc;
      char *v = memcached_get(memc, keys[i % keyspace], lens[i % keyspace], &len, &flags, &rc);
      if (rc != MEMCACHED_SUCCESS || !v || (long)len != bytes) errors++;
      free(v);
    }
    returned = ops - errors;
  } else if (!strcmp(workload, "get_miss")) {
    for (long i = 0; i < ops; i++) {
      size_t len; uint32_t flags; memcached_return_t rc;
      char *v = memcached_get(memc, keys[i % keyspace], lens[i % keyspace], &len, &flags, &rc);
      if (rc != MEMCACHED_NOTFOUND) errors++;
      free(v);
    }
    returned = ops;
  } else if (!strcmp(workload, "set")) {
    for (long i = 0; i < ops; i++)
      if (memcached_set(memc, keys[i % keyspace], lens[i % keyspace], value, bytes, 0, 0) != MEMCACHED_SUCCESS)
        errors++;
    returned = ops;
  } else if (!strcmp(workload, "set_noreply")) {
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_NOREPLY, 1);
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_BUFFER_REQUESTS, 1);
    for (long i = 0; i < ops; i++) {
      memcached_return_t rc = memcached_set(memc, keys[i % keyspace], lens[i % keyspace], value, bytes, 0, 0);
      if (rc != MEMCACHED_SUCCESS && rc != MEMCACHED_BUFFERED) errors++;
    }
    memcached_flush_buffers(memc);
    /* One round trip per server so that everything was processed. */
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_NOREPLY, 0);
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_BUFFER_REQUESTS, 0);
    memcached_version(memc);
    returned = ops;
  } else if (!strcmp(workload, "mget100")) {
    memcached_result_st result;
    memcached_result_create(memc, &result);
    long windows = keyspace - 99;
    for (long i = 0; i < ops; i++) {
      long start = (i * 100) % windows;
      if (memcached_mget(memc, (const char *const *)&keys[start], &lens[start], 100) != MEMCACHED_SUCCESS) {
        errors++; continue;
      }
      long n = 0;
      memcached_return_t rc;
      while (memcached_fetch_result(memc, &result, &rc) != NULL)
        if ((long)memcached_result_length(&result) == bytes) n++;
      if (n != 100) errors++;
      returned += n;
    }
    memcached_result_free(&result);
  }
  double wall = now() - t0;
  cpu(&u1, &s1);
  double cpu_s = (u1 - u0) + (s1 - s0);
  printf("RESULT client=libmemcached/%s proto=%s workload=%s servers=%d dist=%s ops=%ld keys=%ld "
         "wall_s=%.6f ops_per_s=%.1f keys_per_s=%.1f user_s=%.6f sys_s=%.6f cpu_us_per_op=%.4f "
         "cpu_us_per_key=%.4f errors=%ld\n",
         LIBMEMCACHED_VERSION_STRING, binary ? "binary" : "text", workload, nservers,
         nservers > 1 ? "ketama_weighted" : "single", ops, returned, wall, ops / wall,
         returned / wall, u1 - u0, s1 - s0, cpu_s * 1e6 / ops, cpu_s * 1e6 / (returned ? returned : 1),
         errors);
  memcached_free(memc);
  return 0;
}
