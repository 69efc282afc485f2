/* phases: runs in three phases, each doing raw syscalls, cpuid and indirect calls,
 * and waits for a line on stdin between phases. A test switches sbe's mode while the
 * guest waits (blocked in read, inside a syscall stub in patch mode), so the switch
 * happens at a point the test controls, with no sleeping. Output must match a native
 * run whatever the mode of each phase. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static unsigned mix(unsigned x) { return x * 2654435761u ^ (x >> 13); }
static unsigned twice(unsigned x) { return mix(mix(x)); }
static unsigned (*const ops[2])(unsigned) = { mix, twice };

static unsigned work(unsigned seed)
{
    unsigned acc = seed;
    for (int i = 0; i < 20000; i++) {
        long pid;
        __asm__ volatile ("syscall" : "=a"(pid) : "a"(39L) : "rcx", "r11", "memory");
        unsigned a, b, c, d;
        __asm__ volatile ("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
        acc = ops[(acc ^ (unsigned)i) & 1](acc + b + (pid > 0));
    }
    return acc;
}

int main(void)
{
    char line[64];
    for (unsigned phase = 1; phase <= 3; phase++) {
        printf("phase %u: %08x\n", phase, work(phase));
        fflush(stdout);
        if (phase < 3 && !fgets(line, sizeof line, stdin))
            return 2;
    }
    puts("phases: done");
    return 0;
}
