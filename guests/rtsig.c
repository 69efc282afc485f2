/*
 * rtsig -- queued real-time signals carry their values, in order.
 *
 * Exercises: real-time signal queueing.  Five SIGRTMIN+1 signals are sent
 * with sigqueue(3), each with a different sigval, while the signal is
 * blocked; unlike standard signals they do not coalesce: all five stay
 * pending and are delivered in the order they were sent, each with its own
 * siginfo (si_code SI_QUEUE, si_value).  A ptrace-based virtualizer sees
 * each delivery as a signal-delivery stop and must re-inject it without
 * losing, merging, reordering or rewriting the siginfo.  The handler only
 * records values; main prints them after unblocking.
 * Expected (exit 0):
 *   sent: 5 3 9 1 7
 *   pending before unblock: yes
 *   received 5: 5 3 9 1 7
 *   all SI_QUEUE from self: yes
 *   rtsig: done
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define NSIG_SENT 5

static const int values[NSIG_SENT] = { 5, 3, 9, 1, 7 };
static volatile int received[NSIG_SENT + 8];
static volatile int nreceived;
static volatile int all_queue = 1;
static pid_t self;

static void on_rt(int sig, siginfo_t *si, void *uctx)
{
    (void)sig;
    (void)uctx;
    if (si->si_code != SI_QUEUE || si->si_pid != self)
        all_queue = 0;
    if (nreceived < (int)(sizeof received / sizeof received[0]))
        received[nreceived] = si->si_value.sival_int;
    nreceived++;
}

int main(void)
{
    struct sigaction sa;
    sigset_t set, pending;
    int sig = SIGRTMIN + 1;
    int ok = 1;

    self = getpid();
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0)
        return 2;

    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_BLOCK, &set, NULL);

    printf("sent:");
    for (int i = 0; i < NSIG_SENT; i++) {
        union sigval v;
        v.sival_int = values[i];
        if (sigqueue(self, sig, v) != 0) {
            printf("\nsigqueue failed\n");
            return 2;
        }
        printf(" %d", values[i]);
    }
    printf("\n");

    sigpending(&pending);
    printf("pending before unblock: %s\n",
           sigismember(&pending, sig) ? "yes" : "no");
    if (nreceived != 0)
        ok = 0;

    sigprocmask(SIG_UNBLOCK, &set, NULL);

    int n = nreceived;
    printf("received %d:", n);
    for (int i = 0; i < n && i < (int)(sizeof received / sizeof received[0]); i++)
        printf(" %d", received[i]);
    printf("\n");
    printf("all SI_QUEUE from self: %s\n", all_queue ? "yes" : "no");
    if (n != NSIG_SENT || !all_queue)
        ok = 0;
    for (int i = 0; ok && i < NSIG_SENT; i++)
        if (received[i] != values[i])
            ok = 0;
    printf("rtsig: done\n");
    return ok ? 0 : 1;
}
