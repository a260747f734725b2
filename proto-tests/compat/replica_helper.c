/* Stores keys through the system libmemcached with one replica per key
 * (MEMCACHED_BEHAVIOR_NUMBER_OF_REPLICAS = 1, binary protocol: libmemcached replicates only
 * over it), so a test can ask each server which keys it holds.
 *
 * usage: replica_helper DIST SERVER...
 *   DIST   modula | ketama   (configured as ring_helper.c does)
 *   SERVER host:port:weight
 * stdin:  one key per line; each is stored with the value "lm:" followed by the key
 * exit:   0 when every set succeeded and the buffered replica writes were flushed
 *
 * Behaviours are set before the servers are added, as in ring_helper.c. Used only by the
 * replicas test.
 */
#include <libmemcached/memcached.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: replica_helper DIST host:port:weight...\n");
    return 2;
  }
  memcached_st *memc = memcached_create(NULL);
  if (strcmp(argv[1], "ketama") == 0) {
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_KETAMA, 1);
  } else if (strcmp(argv[1], "modula") != 0) {
    fprintf(stderr, "unknown distribution %s\n", argv[1]);
    return 2;
  }
  memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, 1);
  memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_NUMBER_OF_REPLICAS, 1);
  for (int i = 2; i < argc; i++) {
    char *spec = strdup(argv[i]);
    char *w = strrchr(spec, ':');
    if (!w) return 2;
    *w++ = 0;
    char *p = strrchr(spec, ':');
    if (!p) return 2;
    *p++ = 0;
    memcached_return_t rc = memcached_server_add_with_weight(
        memc, spec, (in_port_t)atoi(p), (uint32_t)atoi(w));
    if (rc != MEMCACHED_SUCCESS) {
      fprintf(stderr, "server_add %s: %s\n", argv[i], memcached_strerror(memc, rc));
      return 1;
    }
    free(spec);
  }
  char key[512];
  char value[600];
  while (fgets(key, sizeof key, stdin)) {
    size_t len = strcspn(key, "\r\n");
    key[len] = 0;
    if (len == 0) continue;
    int vlen = snprintf(value, sizeof value, "lm:%s", key);
    memcached_return_t rc = memcached_set(memc, key, len, value, (size_t)vlen, 0, 0);
    if (rc != MEMCACHED_SUCCESS) {
      fprintf(stderr, "set %s: %s\n", key, memcached_strerror(memc, rc));
      return 1;
    }
  }
  /* The replicas' sets are quiet and may still be buffered. */
  memcached_return_t rc = memcached_flush_buffers(memc);
  if (rc != MEMCACHED_SUCCESS) {
    fprintf(stderr, "flush_buffers: %s\n", memcached_strerror(memc, rc));
    return 1;
  }
  memcached_free(memc);
  return 0;
}
