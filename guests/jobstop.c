/*
 * jobstop -- job control seen by a parent: a child that stops itself with
 * SIGSTOP and is continued by its parent, and one stopped by SIGTSTP from its
 * parent.
 *
 * Exercises: group-stops of a traced guest.  A tracer that resumes a stopped
 * task (instead of keeping it stopped with PTRACE_LISTEN) lets the child run
 * on while its parent believes it stopped.  Each child, once it may go on,
 * writes a byte to the `ran` pipe; the parent looks for that byte while the
 * child should be stopped (natively there never is one: the look is bounded
 * only so that a wrong run ends) and after it has continued it.  The parent
 * prints every status waitpid gives it, decoded (never pids).  A child ends
 * only when told to, so its end cannot stand in for the "continued" report.
 *
 * Usage: jobstop
 * Expected: the statuses below, one per line, then "jobstop: ok", exit 0.
 */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static int ran[2], go[2];

static void show(const char *who, int st)
{
    if (WIFSTOPPED(st))
        printf("%s: stopped by signal %d\n", who, WSTOPSIG(st));
    else if (WIFCONTINUED(st))
        printf("%s: continued\n", who);
    else if (WIFEXITED(st))
        printf("%s: exited %d\n", who, WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        printf("%s: killed by signal %d\n", who, WTERMSIG(st));
    fflush(stdout);
}

static int wait_for(pid_t pid, int flags, const char *who)
{
    int st;
    if (waitpid(pid, &st, flags) != pid) {
        perror("waitpid");
        exit(2);
    }
    show(who, st);
    return st;
}

/* Whether the child wrote to `ran` within 300 ms (natively: never while stopped). */
static int child_ran(const char *who)
{
    struct pollfd p = { .fd = ran[0], .events = POLLIN };
    int got = poll(&p, 1, 300) == 1;
    printf("%s: ran while stopped: %s\n", who, got ? "yes" : "no");
    return got;
}

static void take(int fd)
{
    char c;
    if (read(fd, &c, 1) != 1)
        _exit(4);
}

static void give(int fd)
{
    if (write(fd, "x", 1) != 1)
        _exit(4);
}

/* Continue a stopped child: the parent sees it continued, it runs (writes to
 * `ran`), and, told to, it ends with `code`. */
static int resume(pid_t pid, const char *who, int code)
{
    int ok = 1, st;
    kill(pid, SIGCONT);
    st = wait_for(pid, WCONTINUED, who);
    ok &= WIFCONTINUED(st);
    take(ran[0]);
    give(go[1]);
    st = wait_for(pid, 0, who);
    ok &= WIFEXITED(st) && WEXITSTATUS(st) == code;
    return ok;
}

int main(void)
{
    int ok = 1, st;

    if (pipe(ran) != 0 || pipe(go) != 0)
        return 2;

    /* 1: the child stops itself; the parent sees it stopped, continues it. */
    pid_t a = fork();
    if (a == 0) {
        raise(SIGSTOP);
        give(ran[1]);
        take(go[0]);
        _exit(7);
    }
    st = wait_for(a, WUNTRACED, "self-stopped child");
    ok &= WIFSTOPPED(st) && WSTOPSIG(st) == SIGSTOP;
    ok &= !child_ran("self-stopped child");
    ok &= resume(a, "self-stopped child", 7);

    /* 2: the parent stops a child (in a process group of its own, so the stop is
     * not discarded as one of an orphaned group) with SIGTSTP while it waits for
     * `go`, gives it `go` while it is stopped, then continues it. */
    pid_t b = fork();
    if (b == 0) {
        setpgid(0, 0);
        take(go[0]);
        give(ran[1]);
        take(go[0]);
        _exit(3);
    }
    setpgid(b, b);
    kill(b, SIGTSTP);
    st = wait_for(b, WUNTRACED, "stopped child");
    ok &= WIFSTOPPED(st) && WSTOPSIG(st) == SIGTSTP;
    give(go[1]);
    ok &= !child_ran("stopped child");
    ok &= resume(b, "stopped child", 3);

    puts(ok ? "jobstop: ok" : "jobstop: FAIL");
    return ok ? 0 : 1;
}
