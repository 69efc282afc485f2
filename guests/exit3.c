/*
 * exit3 -- non-zero exit status propagation.
 *
 * Exercises: returning a status from main (via glibc exit -> exit_group) so
 * the virtualizer must report the guest's real exit code.
 * Expected: stdout "exiting with 3\n", exit status 3.
 */
#include <stdio.h>

int main(void)
{
    printf("exiting with 3\n");
    return 3;
}
