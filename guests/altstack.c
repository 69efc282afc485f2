/*
 * altstack -- signal handlers on an alternate signal stack.
 *
 * Exercises: sigaltstack(2) + SA_ONSTACK.  The kernel must build the signal
 * frame on the alternate stack; a virtualizer that delivers or re-injects
 * signals itself (or runs guest code on stacks of its own) must preserve
 * that.  Two cases:
 *   1. SIGUSR2 sent with raise(): the handler checks that a local variable
 *      lies inside the malloc'd alternate stack and that sigaltstack()
 *      reports SS_ONSTACK.
 *   2. Unbounded recursion overflows the main stack; the resulting SIGSEGV
 *      can only be handled because the frame goes on the alternate stack.
 *      The handler checks its local is on the alternate stack, prints, and
 *      calls _exit(0).
 * The soft RLIMIT_STACK is lowered to 8 MiB if it is larger (e.g.
 * "unlimited"), so the overflow happens quickly everywhere.  Output goes
 * through write(2) only (handlers are async-signal-safe); the recursion
 * depth is never printed.
 * Expected (exit 0):
 *   SIGUSR2 on altstack: yes
 *   SIGUSR2 SS_ONSTACK: yes
 *   overflow caught on altstack: yes
 */
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define STACK_LIMIT (8UL << 20)

static char *alt_base;
static size_t alt_size;

static void out(const char *s)
{
    (void)!write(1, s, strlen(s));
}

static int on_altstack(const void *p)
{
    uintptr_t a = (uintptr_t)p, b = (uintptr_t)alt_base;
    return a >= b && a < b + alt_size;
}

static void on_usr2(int sig)
{
    volatile int local = sig;
    stack_t cur;
    out(on_altstack((const void *)&local) ? "SIGUSR2 on altstack: yes\n"
                                          : "SIGUSR2 on altstack: no\n");
    if (sigaltstack(NULL, &cur) == 0 && (cur.ss_flags & SS_ONSTACK))
        out("SIGUSR2 SS_ONSTACK: yes\n");
    else
        out("SIGUSR2 SS_ONSTACK: no\n");
}

static void on_segv(int sig)
{
    volatile int local = sig;
    out(on_altstack((const void *)&local)
            ? "overflow caught on altstack: yes\n"
            : "overflow caught on altstack: no\n");
    _exit(0);
}

static volatile unsigned long depth_limit = ~0UL;   /* never reached */

/* Each frame holds a 1 KiB volatile buffer that is used after the
 * recursive call returns, so the call is neither a tail call nor removable. */
__attribute__((noinline)) static unsigned long recurse(unsigned long depth)
{
    volatile char buf[1024];
    buf[0] = (char)depth;
    buf[sizeof buf - 1] = (char)(depth >> 8);
    if (depth >= depth_limit)
        return buf[0];
    return recurse(depth + 1) + buf[0] + buf[sizeof buf - 1];
}

int main(void)
{
    struct sigaction sa;
    struct rlimit rl;
    stack_t ss;

    if (getrlimit(RLIMIT_STACK, &rl) == 0 &&
        (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > STACK_LIMIT)) {
        rl.rlim_cur = STACK_LIMIT;
        setrlimit(RLIMIT_STACK, &rl);
    }

    alt_size = 256 * 1024;
    if (alt_size < (size_t)SIGSTKSZ)
        alt_size = (size_t)SIGSTKSZ;
    alt_base = malloc(alt_size);
    if (!alt_base)
        return 2;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = alt_base;
    ss.ss_size = alt_size;
    if (sigaltstack(&ss, NULL) != 0) {
        out("sigaltstack failed\n");
        return 2;
    }

    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_ONSTACK;
    sa.sa_handler = on_usr2;
    if (sigaction(SIGUSR2, &sa, NULL) != 0)
        return 2;
    sa.sa_handler = on_segv;
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        return 2;

    raise(SIGUSR2);

    recurse(0);
    out("overflow not caught\n");
    return 1;
}
