/*
 * sigsegv_handler -- a guest that handles its own SIGSEGV.
 *
 * Exercises: signal delivery to a guest-installed SA_SIGINFO handler for a
 * fault (NULL store), i.e. the virtualizer must pass the fault through to
 * the guest rather than treat it as its own.  The handler uses only
 * async-signal-safe calls (write, _exit).
 * Expected: stdout "caught SIGSEGV\n", exit 0.
 */
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_segv(int sig, siginfo_t *info, void *uctx)
{
    static const char msg[] = "caught SIGSEGV\n";
    (void)info;
    (void)uctx;
    if (sig == SIGSEGV)
        (void)!write(1, msg, sizeof msg - 1);
    _exit(sig == SIGSEGV ? 0 : 1);
}

int main(void)
{
    struct sigaction sa;
    volatile int *volatile p = NULL;   /* see segv.c: no ud2, no dead store */

    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        return 2;
    *p = 1;
    return 1;   /* not reached */
}
