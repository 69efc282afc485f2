/*
 * restart -- SA_RESTART vs EINTR for a signal interrupting a blocking read.
 *
 * Exercises: a signal arriving while the guest is blocked in read(2) on an
 * empty pipe.  With SA_RESTART the kernel restarts the read after the
 * handler (the syscall is re-executed: RIP is backed up over the `syscall`
 * and RAX restored), so it completes with the data written later; without
 * SA_RESTART the read fails with EINTR.  A virtualizer that traps or
 * emulates syscalls must get both the restart and the EINTR result right.
 *   1. SA_RESTART: SIGALRM (one-shot setitimer, 20 ms) interrupts the read;
 *      the handler posts a semaphore; a helper thread (which has SIGALRM
 *      blocked, so the signal goes to the main thread) waits for that
 *      semaphore and only then writes "hello" to the pipe.  So the data
 *      arrives strictly after the handler has run: the read can only get it
 *      by being restarted.
 *   2. no SA_RESTART: SIGALRM every 20 ms (periodic, so a tick that comes
 *      before the read has started cannot leave it blocked forever)
 *      interrupts a read on an empty pipe, which must return -1/EINTR.
 * Expected (exit 0):
 *   SA_RESTART: handler ran: yes, read returned 5 "hello"
 *   no SA_RESTART: handler ran: yes, read returned -1 errno EINTR
 *   restart: done
 */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static sem_t alarm_seen;
static volatile sig_atomic_t handler_calls;
static int pfd[2];

static void on_alarm(int sig)
{
    (void)sig;
    handler_calls++;
    sem_post(&alarm_seen);          /* async-signal-safe */
}

static void *writer(void *arg)
{
    (void)arg;
    while (sem_wait(&alarm_seen) != 0)
        ;
    (void)!write(pfd[1], "hello", 5);
    return NULL;
}

static void set_handler(int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
}

static void set_timer(long first_us, long interval_us)
{
    struct itimerval it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_usec = first_us;
    it.it_interval.tv_usec = interval_us;
    setitimer(ITIMER_REAL, &it, NULL);
}

static void report(const char *what, ssize_t n, int err, const char *buf)
{
    printf("%s: handler ran: %s, read returned %zd", what,
           handler_calls > 0 ? "yes" : "no", n);
    if (n > 0)
        printf(" \"%.*s\"", (int)n, buf);
    else if (n < 0)
        printf(" errno %s", err == EINTR ? "EINTR" : strerror(err));
    printf("\n");
}

int main(void)
{
    pthread_t t;
    sigset_t alrm, old;
    char buf[16];
    ssize_t n;
    int err, failures = 0;

    if (sem_init(&alarm_seen, 0, 0) != 0 || pipe(pfd) != 0)
        return 2;

    /* ---- 1. SA_RESTART -------------------------------------------- */
    set_handler(SA_RESTART);
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    pthread_sigmask(SIG_BLOCK, &alrm, &old);      /* inherited by writer */
    if (pthread_create(&t, NULL, writer, NULL) != 0)
        return 2;
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    handler_calls = 0;
    set_timer(20000, 0);
    n = read(pfd[0], buf, sizeof buf);        /* restarted, never EINTR */
    err = errno;
    pthread_join(t, NULL);
    report("SA_RESTART", n, err, buf);
    if (n != 5 || handler_calls != 1)
        failures++;

    /* ---- 2. no SA_RESTART ----------------------------------------- */
    set_handler(0);
    handler_calls = 0;
    set_timer(20000, 20000);
    n = read(pfd[0], buf, sizeof buf);
    err = errno;
    set_timer(0, 0);
    report("no SA_RESTART", n, err, buf);
    if (n != -1 || err != EINTR)
        failures++;

    printf("restart: done\n");
    return failures ? 1 : 0;
}
