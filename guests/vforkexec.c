/*
 * vforkexec -- vfork + execve, and posix_spawn.
 *
 * Exercises: vfork(2) (CLONE_VM | CLONE_VFORK: the child runs in the
 * parent's address space, on the parent's stack, while the parent is
 * suspended until the child execs or exits) followed by execve of
 * /bin/echo, and posix_spawn(3) of /bin/true (glibc implements it with
 * clone(CLONE_VM | CLONE_VFORK) on a separate stack).  A virtualizer must
 * cope with a child sharing the parent's memory (patched code and all), with
 * the vfork-done event, and with the exec replacing the child's image.
 * Output is flushed before each child is created; echo writes its line
 * directly to the shared stdout before the parent resumes printing.
 * Expected: "vfork-child-ran", "vfork child: exited with status 0",
 *           "posix_spawn /bin/true: exited with status 0",
 *           "vforkexec: done", exit 0.
 */
#include <spawn.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static int report(const char *what, pid_t pid)
{
    int status;
    pid_t w;
    do
        w = waitpid(pid, &status, 0);
    while (w < 0);
    if (WIFEXITED(status)) {
        printf("%s: exited with status %d\n", what, WEXITSTATUS(status));
        return WEXITSTATUS(status) != 0;
    }
    if (WIFSIGNALED(status))
        printf("%s: killed by signal %d\n", what, WTERMSIG(status));
    else
        printf("%s: unexpected status\n", what);
    return 1;
}

int main(void)
{
    static char *const echo_argv[] = { "echo", "vfork-child-ran", NULL };
    static char *const true_argv[] = { "true", NULL };
    int failures = 0;

    fflush(stdout);
    pid_t pid = vfork();
    if (pid < 0) {
        printf("vfork failed\n");
        return 2;
    }
    if (pid == 0) {
        /* Only execve/_exit are allowed in a vfork child. */
        execve("/bin/echo", echo_argv, environ);
        _exit(127);
    }
    failures += report("vfork child", pid);
    fflush(stdout);

    pid_t spid;
    int rc = posix_spawn(&spid, "/bin/true", NULL, NULL, true_argv, environ);
    if (rc != 0) {
        printf("posix_spawn failed: %d\n", rc);
        return 2;
    }
    failures += report("posix_spawn /bin/true", spid);

    printf("vforkexec: done\n");
    return failures ? 1 : 0;
}
