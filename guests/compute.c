/*
 * compute -- a branchy, CPU-bound integer workload.
 *
 * Exercises: long stretches of ordinary code with many data-dependent
 * conditional branches and ordinary calls/returns but no sensitive
 * instructions, i.e. code the virtualizer should run at (near) native
 * speed.  Used as a benchmark: runs roughly 0.3 s natively at the default
 * scale.  Work per pass: Collatz chain lengths, a sieve of Eratosthenes and a
 * conditional integer mixer; everything is folded into one checksum.
 *
 * Usage: compute [scale]   (scale = number of passes, default 15)
 * Expected: "compute: scale=<n> checksum=0x<hex>", exit 0.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_SCALE 15
#define COLLATZ_N     150000
#define SIEVE_N       400000
#define MIX_N         400000

static unsigned char sieve_buf[SIEVE_N + 1];

__attribute__((noinline)) static uint32_t collatz(uint32_t base)
{
    uint32_t best = 0, best_n = 0, total = 0;
    for (uint32_t n = base + 1; n <= base + COLLATZ_N; n++) {
        uint64_t v = n;
        uint32_t len = 0;
        while (v != 1) {
            if (v & 1)
                v = 3 * v + 1;
            else
                v >>= 1;
            len++;
        }
        total += len;
        if (len > best) {
            best = len;
            best_n = n;
        }
    }
    return total ^ (best << 20) ^ best_n;
}

__attribute__((noinline)) static uint32_t sieve(void)
{
    uint32_t count = 0, h = 0;
    memset(sieve_buf, 1, sizeof sieve_buf);
    sieve_buf[0] = sieve_buf[1] = 0;
    for (uint32_t i = 2; (uint64_t)i * i <= SIEVE_N; i++)
        if (sieve_buf[i])
            for (uint32_t j = i * i; j <= SIEVE_N; j += i)
                sieve_buf[j] = 0;
    for (uint32_t i = 0; i <= SIEVE_N; i++)
        if (sieve_buf[i]) {
            count++;
            h = h * 31 + i;
        }
    return count ^ h;
}

__attribute__((noinline)) static uint32_t mixer(uint32_t s)
{
    uint32_t a = s | 1, b = 0x9e3779b9u, c = 0;
    for (uint32_t i = 0; i < MIX_N; i++) {
        a = a * 1103515245u + 12345u;
        if (a & 0x100)
            b += a >> 7;
        else if (a & 0x200)
            b ^= a << 3;
        else
            b -= a;
        if ((b & 7) == 3)
            c += b % 1009;
        else if (b & 0x80000000u)
            c ^= b >> 11;
        else
            c = (c << 1) | (c >> 31);
    }
    return a ^ b ^ c;
}

int main(int argc, char **argv)
{
    long scale = DEFAULT_SCALE;
    if (argc > 1) {
        scale = strtol(argv[1], NULL, 10);
        if (scale < 1)
            scale = 1;
    }

    uint32_t sum = 0x811c9dc5u;
    for (long pass = 0; pass < scale; pass++) {
        sum = (sum ^ collatz((uint32_t)pass * 1000)) * 0x01000193u;
        sum = (sum ^ sieve()) * 0x01000193u;
        sum = (sum ^ mixer(sum)) * 0x01000193u;
    }
    printf("compute: scale=%ld checksum=0x%08x\n", scale, sum);
    return 0;
}
