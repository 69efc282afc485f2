/* calls: call/return-heavy recursion (naive fib and ackermann).
 * Optional argv[1]: fib argument (default sized for ~3 s natively). Prints a checksum. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static unsigned long fib(unsigned n)
{
    return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

__attribute__((noinline)) static unsigned long ack(unsigned long m, unsigned long n)
{
    if (m == 0)
        return n + 1;
    if (n == 0)
        return ack(m - 1, 1);
    return ack(m - 1, ack(m, n - 1));
}

int main(int argc, char **argv)
{
    unsigned n = argc > 1 ? (unsigned)atoi(argv[1]) : 45;
    unsigned long f = fib(n);
    unsigned long a = ack(2, 10000);
    printf("calls fib(%u)=%lu ack(2,10000)=%lu\n", n, f, a);
    return 0;
}
