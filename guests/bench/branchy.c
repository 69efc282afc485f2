/* branchy: data-dependent branches and a dense switch (jump table) on an LCG stream.
 * Optional argv[1]: rounds (default sized for ~3 s natively). Prints a checksum. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

static uint64_t step(uint64_t acc, uint32_t op, uint32_t x)
{
    switch (op) {            /* 16 dense cases: gcc emits a jump table */
    case 0:  return acc + x;
    case 1:  return acc ^ (x * 2654435761u);
    case 2:  return acc - (x >> 3);
    case 3:  return (acc << 1) | (acc >> 63);
    case 4:  return acc * 3 + 1;
    case 5:  return acc + (x & 0xff) * 7;
    case 6:  return acc ^ (acc >> 17);
    case 7:  return acc + (x % 13);
    case 8:  return (x & 1) ? acc + 11 : acc - 5;
    case 9:  return acc ^ 0x9e3779b97f4a7c15ull;
    case 10: return acc + (acc >> 29);
    case 11: return acc - x * 5;
    case 12: return (acc & 0xffff) > x ? acc + 1 : acc + 2;
    case 13: return acc * 0x100000001b3ull;
    case 14: return acc + (x < 1000000 ? 3 : 9);
    default: return ~acc;
    }
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 350000000;
    uint32_t s = 12345;
    uint64_t acc = 1;
    for (long i = 0; i < rounds; i++) {
        s = s * 1103515245u + 12345u;
        uint32_t x = s >> 8;
        acc = step(acc, (s >> 24) & 15, x);
        if ((x & 7) == 3)      /* an unpredictable branch besides the table */
            acc += i;
    }
    printf("branchy %ld %016llx\n", rounds, (unsigned long long)acc);
    return 0;
}
