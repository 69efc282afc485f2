/*
 * segv -- death by an unhandled SIGSEGV.
 *
 * Exercises: a guest killed by a fatal signal; the virtualizer must let it
 * die the same way (shell exit status 139 = 128 + SIGSEGV) and must not lose
 * output flushed before the crash.
 * Expected: stdout "about to crash\n", killed by SIGSEGV (139 from a shell).
 */
#include <stdio.h>

int main(void)
{
    /* Both the pointer and the pointee are volatile: the compiler can
     * neither prove the pointer is NULL (and emit ud2 instead) nor drop
     * the store as dead. */
    volatile int *volatile p = NULL;

    printf("about to crash\n");
    fflush(stdout);
    *p = 42;
    printf("not reached\n");
    return 0;
}
