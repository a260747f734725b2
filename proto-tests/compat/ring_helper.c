/* Asks the system libmemcached which server it picks for each key.
 *
 * usage: ring_helper DIST HASH SERVER...
 *   DIST   modula | ketama | ketama_weighted
 *   HASH   default | one_at_a_time | md5 | crc | fnv1_64 | fnv1a_64 | fnv1_32 | fnv1a_32 |
 *          murmur | jenkins | murmur3
 *   SERVER host:port:weight
 * stdin:  keys, each as a 2-byte little-endian length followed by the key's bytes
 * stdout: one server index per key, one per line
 *
 * Behaviours are set before the servers are added, so the continuum points and the keys use
 * the same hash (see ketama-and-hashing.md, section 2). Used only by the compatibility test.
 */
#include <libmemcached/memcached.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int hash_by_name(const char *name) {
  static const struct { const char *name; memcached_hash_t h; } table[] = {
      {"one_at_a_time", MEMCACHED_HASH_DEFAULT}, {"md5", MEMCACHED_HASH_MD5},
      {"crc", MEMCACHED_HASH_CRC},               {"fnv1_64", MEMCACHED_HASH_FNV1_64},
      {"fnv1a_64", MEMCACHED_HASH_FNV1A_64},     {"fnv1_32", MEMCACHED_HASH_FNV1_32},
      {"fnv1a_32", MEMCACHED_HASH_FNV1A_32},     {"murmur", MEMCACHED_HASH_MURMUR},
      {"jenkins", MEMCACHED_HASH_JENKINS},       {"murmur3", MEMCACHED_HASH_MURMUR3},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp(name, table[i].name) == 0) return (int)table[i].h;
  return -1;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: ring_helper DIST HASH host:port:weight...\n");
    return 2;
  }
  memcached_st *memc = memcached_create(NULL);
  if (strcmp(argv[1], "ketama") == 0) {
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_KETAMA, 1);
  } else if (strcmp(argv[1], "ketama_weighted") == 0) {
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
  } else if (strcmp(argv[1], "modula") != 0) {
    fprintf(stderr, "unknown distribution %s\n", argv[1]);
    return 2;
  }
  if (strcmp(argv[2], "default") != 0) {
    int h = hash_by_name(argv[2]);
    if (h < 0) {
      fprintf(stderr, "unknown hash %s\n", argv[2]);
      return 2;
    }
    memcached_behavior_set(memc, MEMCACHED_BEHAVIOR_HASH, (uint64_t)h);
  }
  for (int i = 3; i < argc; i++) {
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
  unsigned char len_le[2];
  char key[65536];
  while (fread(len_le, 1, 2, stdin) == 2) {
    size_t len = (size_t)len_le[0] | (size_t)len_le[1] << 8;
    if (fread(key, 1, len, stdin) != len) return 1;
    printf("%u\n", memcached_generate_hash(memc, key, len));
  }
  memcached_free(memc);
  return 0;
}
