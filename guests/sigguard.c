/* sigguard: a signal handler sends its frame back to an indirect `call rax` with
 * another target in rax. In patch mode that call is guarded (its stub checks rax,
 * then the call itself runs): the handler's rax was never checked, so sbe must not
 * let the call run natively on it. Prints which function the call reached. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

long run(long (*f)(void));
/* The call's offset in run. Not a symbol, nor any address the code takes: either
 * would tell the scanner that control may land there, and the call would get no
 * guard. tests/test_containment.py checks a guarded call is there. */
#define GUARDED_SITE 34

/* run(f): kill(getpid(), SIGUSR1), then call f. */
__asm__(
    ".text\n"
    ".globl run\n"
    "run:\n"
    "    push %rbx\n"
    "    mov %rdi, %rbx\n"
    "    mov $39, %eax\n"          /* getpid */
    "    syscall\n"
    "    mov %rax, %rdi\n"
    "    mov $10, %esi\n"          /* SIGUSR1 */
    "    mov $62, %eax\n"          /* kill */
    "    syscall\n"
    "    mov %rbx, %rax\n"
    "    mov $0, %ecx\n"           /* five bytes the guard's jump can take */
    "    call *%rax\n"
    "    pop %rbx\n"
    "    ret\n");

static long first(void) { return 1; }
static long second(void) { return 2; }

static void handler(int sig, siginfo_t *info, void *context)
{
    (void)sig; (void)info;
    ucontext_t *uc = context;
    uc->uc_mcontext.gregs[REG_RIP] = (greg_t)((char *)run + GUARDED_SITE);
    uc->uc_mcontext.gregs[REG_RAX] = (greg_t)second;
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, NULL);
    long first_result = run(first);
    printf("the call reached %s\n", first_result == 2 ? "second" : "first");
    return 0;
}
