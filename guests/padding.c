/*
 * padding -- 2-byte sites no 5-byte window fits, next to alignment padding.
 *
 * Exercises: the `jmp rel8` to padding.  Each loop below has its head at a
 * 16-byte boundary, and the head is a 2-byte site (rdtsc, syscall, call *%rax)
 * whose next instruction is a branch target too: no neighbour can move with
 * it, so patch mode can only jump `jmp rel8` into the nop padding before the
 * head, and from there to the stub (or trap every time).  Meanwhile a 200 us
 * interval timer sends SIGALRM, and the handler counts interrupted rips that
 * lie in the first three loops' padding: natively none can, and a virtualizer
 * must not show one either.  The last loop jumps into its padding on purpose
 * (through a register): natively that runs the nops and falls into the loop
 * head.
 * Expected (exit 0):
 *   rdtsc loop: 20000 rounds, clock never went back: yes
 *   syscall loop: getppid right 20000 of 20000
 *   call loop: 20000 calls
 *   jump into padding: 100 rounds
 *   rip in padding: 0
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

#define ROUNDS 20000

/* Each loop: a prologue, `jmp` over the padding to the instruction after the
 * head, the padding, then the head (a site) and the rest of the body. The
 * `jmp` starts a 16-byte block, so 14 bytes of padding follow it. */
__asm__(
    ".text\n"
    /* uint64_t pad_rdtsc(uint64_t rounds): rounds in which the clock did not go back */
    ".p2align 5\n"
    ".globl pad_rdtsc\n"
    "pad_rdtsc:\n"
    "  mov %rdi, %rcx\n"
    "  xor %esi, %esi\n"
    "  xor %r8d, %r8d\n"
    "  xor %eax, %eax\n"
    "  xor %edx, %edx\n"
    "  .p2align 4\n"
    "  jmp 2f\n"
    ".globl pad_rdtsc_padding\n"
    "pad_rdtsc_padding:\n"
    "  .p2align 4\n"
    ".globl pad_rdtsc_head\n"
    "pad_rdtsc_head:\n"
    "1: rdtsc\n"
    "2: shl $32, %rdx\n"
    "  or %rax, %rdx\n"
    "  cmp %r8, %rdx\n"
    "  jb 3f\n"
    "  inc %rsi\n"
    "3: mov %rdx, %r8\n"
    "  dec %rcx\n"
    "  jne 1b\n"
    "  mov %rsi, %rax\n"
    "  ret\n"

    /* uint64_t pad_syscall(uint64_t rounds, uint64_t ppid): getppid calls that gave ppid */
    ".p2align 5\n"
    ".globl pad_syscall\n"
    "pad_syscall:\n"
    "  mov %rdi, %r8\n"
    "  mov %rsi, %r9\n"
    "  xor %r10d, %r10d\n"
    "  mov %rsi, %rax\n"
    "  .p2align 4\n"
    "  jmp 2f\n"
    ".globl pad_syscall_padding\n"
    "pad_syscall_padding:\n"
    "  .p2align 4\n"
    ".globl pad_syscall_head\n"
    "pad_syscall_head:\n"
    "1: syscall\n"
    "2: cmp %r9, %rax\n"
    "  jne 3f\n"
    "  inc %r10\n"
    "3: mov $110, %eax\n"
    "  dec %r8\n"
    "  jne 1b\n"
    "  mov %r10, %rax\n"
    "  ret\n"

    /* void pad_call(uint64_t rounds, void (*fn)(void)): fn called rounds times */
    ".p2align 5\n"
    ".globl pad_call\n"
    "pad_call:\n"
    "  push %rbx\n"
    "  push %r12\n"
    "  push %r13\n"
    "  mov %rdi, %rbx\n"
    "  mov %rsi, %r12\n"
    "  .p2align 4\n"
    "  jmp 2f\n"
    ".globl pad_call_padding\n"
    "pad_call_padding:\n"
    "  .p2align 4\n"
    ".globl pad_call_head\n"
    "pad_call_head:\n"
    "1: call *%rax\n"
    "2: mov %r12, %rax\n"
    "  dec %rbx\n"
    "  jns 1b\n"
    "  pop %r13\n"
    "  pop %r12\n"
    "  pop %rbx\n"
    "  ret\n"

    /* uint64_t pad_into(uint64_t rounds): enters its loop through its padding */
    ".p2align 5\n"
    ".globl pad_into\n"
    "pad_into:\n"
    "  mov %rdi, %rcx\n"
    "  xor %r8d, %r8d\n"
    "  lea 2f(%rip), %rsi\n"
    "  lea pad_into_padding(%rip), %rdx\n"
    /* never taken (rounds > 0): it makes the loop head known to a scan of
     * this code, before the jump into the padding arrives there */
    "  test %rdi, %rdi\n"
    "  jz 1f\n"
    "  .p2align 4\n"
    "  jmp *%rdx\n"
    ".globl pad_into_padding\n"
    "pad_into_padding:\n"
    "  .p2align 4\n"
    ".globl pad_into_head\n"
    "pad_into_head:\n"
    "1: rdtsc\n"
    "2: inc %r8\n"
    "  dec %rcx\n"
    "  jne 1b\n"
    "  mov %r8, %rax\n"
    "  ret\n");

uint64_t pad_rdtsc(uint64_t rounds);
uint64_t pad_syscall(uint64_t rounds, uint64_t ppid);
void pad_call(uint64_t rounds, void (*fn)(void));
uint64_t pad_into(uint64_t rounds);
extern char pad_rdtsc_padding[], pad_rdtsc_head[], pad_syscall_padding[], pad_syscall_head[],
    pad_call_padding[], pad_call_head[];

static volatile uint64_t calls, in_padding;

static void count_call(void) { calls++; }

static void on_alarm(int sig, siginfo_t *info, void *context) {
    (void)sig, (void)info;
    uintptr_t rip = ((ucontext_t *)context)->uc_mcontext.gregs[REG_RIP];
    const struct { char *start, *end; } runs[] = {
        {pad_rdtsc_padding, pad_rdtsc_head}, {pad_syscall_padding, pad_syscall_head},
        {pad_call_padding, pad_call_head},    /* not pad_into's: it runs its padding */
    };
    for (unsigned i = 0; i < sizeof runs / sizeof runs[0]; i++)
        if ((uintptr_t)runs[i].start <= rip && rip < (uintptr_t)runs[i].end)
            in_padding++;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = {{0, 200}, {0, 200}};
    setitimer(ITIMER_REAL, &every, NULL);

    uint64_t forward = pad_rdtsc(ROUNDS);
    printf("rdtsc loop: %d rounds, clock never went back: %s\n", ROUNDS,
           forward == ROUNDS ? "yes" : "no");
    printf("syscall loop: getppid right %llu of %d\n",
           (unsigned long long)pad_syscall(ROUNDS, (uint64_t)getppid()), ROUNDS);
    pad_call(ROUNDS, count_call);
    printf("call loop: %llu calls\n", (unsigned long long)calls);
    printf("jump into padding: %llu rounds\n", (unsigned long long)pad_into(100));

    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("rip in padding: %llu\n", (unsigned long long)in_padding);
    return 0;
}
