/*
 * forkwait -- fork, per-child output, exit statuses, wait.
 *
 * Exercises: fork(2) (a clone without CLONE_VM: the child gets a copy of the
 * address space, including any code the virtualizer has patched, and must
 * itself be traced/virtualized), output from children, and the parent
 * collecting each child's exit status with waitpid.  A ptrace-based
 * virtualizer must not swallow the children's exit statuses or the parent's
 * wait results (it sees the same exits as a tracer).  Children are forked
 * one at a time and each is waited for before the next is forked, and all
 * output is flushed before each fork, so the output order is fixed whether
 * stdout is a terminal, a pipe or a file.
 * Expected: for i = 0..2 "child <i>: value=<v>" then
 *           "parent: child <i> exited with status <i+10>", then
 *           "forkwait: done", exit 0.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define NCHILDREN 3

/* Some work in the child, so it runs code after the fork. */
static uint32_t child_value(int index)
{
    uint32_t h = 0x811c9dc5u;
    for (uint32_t i = 0; i < 1000u * (uint32_t)(index + 1); i++)
        h = (h ^ (i * 7u + (uint32_t)index)) * 0x01000193u;
    return h;
}

int main(void)
{
    int failures = 0;

    for (int i = 0; i < NCHILDREN; i++) {
        fflush(stdout);                 /* nothing buffered is duplicated */
        pid_t pid = fork();
        if (pid < 0) {
            printf("fork failed\n");
            return 2;
        }
        if (pid == 0) {
            printf("child %d: value=0x%08x\n", i, child_value(i));
            fflush(stdout);
            _exit(i + 10);
        }

        int status;
        pid_t w;
        do
            w = waitpid(pid, &status, 0);
        while (w < 0);
        if (WIFEXITED(status)) {
            printf("parent: child %d exited with status %d\n",
                   i, WEXITSTATUS(status));
            if (WEXITSTATUS(status) != i + 10)
                failures++;
        } else if (WIFSIGNALED(status)) {
            printf("parent: child %d killed by signal %d\n",
                   i, WTERMSIG(status));
            failures++;
        } else {
            printf("parent: child %d: unexpected status\n", i);
            failures++;
        }
        fflush(stdout);
    }
    printf("forkwait: done\n");
    return failures ? 1 : 0;
}
