/* mixed: hash a buffer with FNV-1a in 4 KiB chunks, write() one hex line per chunk to
 * /dev/null (or argv[2]), in batches of 64 lines.  Optional argv[1]: passes.
 * Prints the final hash and the bytes written. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define BUF (1 << 20)
#define CHUNK 4096

static unsigned char buf[BUF];

int main(int argc, char **argv)
{
    long passes = argc > 1 ? atol(argv[1]) : 2500;
    const char *path = argc > 2 ? argv[2] : "/dev/null";
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    uint32_t s = 1;
    for (size_t i = 0; i < BUF; i++) {
        s = s * 1664525u + 1013904223u;
        buf[i] = s >> 24;
    }
    char out[64 * 32];
    size_t used = 0;
    long long written = 0;
    uint64_t total = 0xcbf29ce484222325ull;
    for (long p = 0; p < passes; p++) {
        buf[p % BUF] ^= (unsigned char)p;          /* each pass hashes different data */
        for (size_t off = 0; off < BUF; off += CHUNK) {
            uint64_t h = 0xcbf29ce484222325ull;
            for (size_t i = off; i < off + CHUNK; i++)
                h = (h ^ buf[i]) * 0x100000001b3ull;
            total = (total ^ h) * 0x100000001b3ull;
            used += (size_t)snprintf(out + used, 32, "%08zx %016llx\n", off, (unsigned long long)h);
            if (used > sizeof out - 32) {
                ssize_t w = write(fd, out, used);
                if (w != (ssize_t)used)
                    return 1;
                written += w;
                used = 0;
            }
        }
    }
    if (used) {
        if (write(fd, out, used) != (ssize_t)used)
            return 1;
        written += used;
    }
    close(fd);
    printf("mixed %ld %016llx %lld\n", passes, (unsigned long long)total, written);
    return 0;
}
