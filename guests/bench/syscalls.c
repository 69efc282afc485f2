/* syscalls: 200000 cheap system calls, getppid() through the libc wrapper.
 * The parent differs per runner, so print only how many calls agreed with the first. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 200000;
    pid_t first = getppid();
    long same = 0;
    for (long i = 0; i < n; i++)
        same += getppid() == first;
    printf("syscalls %ld same=%ld\n", n, same);
    return 0;
}
