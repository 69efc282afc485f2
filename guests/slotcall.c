/*
 * slotcall -- indirect calls through memory, each in a hot loop.
 *
 * Exercises: the slot call (patch mode's stub for `call [mem]` checks the
 * target, leaves it below rsp, and the window ends in `call [rsp - 8]`).  Four
 * loops call through memory in four forms: [reg + disp8] (3 bytes), [reg +
 * disp32] (6 bytes), [rip + disp32], and [rsp].  The callee checks that its
 * return address is the instruction after its call site, as natively.  A 500 us
 * interval timer sends SIGALRM meanwhile; the handler counts interrupted rips
 * inside the loops that are not one of their instruction boundaries (natively
 * none can be), and in one of every 16 deliveries sets the interrupted rax to
 * a value the loop ignores.  Threads: with an argument, each loop also runs in
 * 3 more threads at once.
 * Expected (exit 0):
 *   disp8: 20000 calls, 0 wrong returns
 *   disp32: 20000 calls, 0 wrong returns
 *   rip: 20000 calls, 0 wrong returns
 *   rsp: 20000 calls, 0 wrong returns
 *   rip off a boundary: 0
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <ucontext.h>

#define ROUNDS 20000

long callee(long x);
long (*slot_fn)(long) = callee;
struct ops { char pad[0x10]; long (*near)(long); char more[0x100 - 0x18]; long (*far)(long); };
static struct ops ops = { .near = callee, .far = callee };
static struct ops *volatile ops_ptr = &ops;

/* Each loop: rdi = &ops_ptr, rsi = rounds; returns the sum of the callee's
 * results. The instructions before each call give its window room. */
#define LOOP(name, setup, call, teardown)                  \
    ".p2align 4\n"                                          \
    ".globl slot_" #name "\n"                               \
    "slot_" #name ":\n"                                     \
    "  push %rbx\n  push %r12\n  push %r13\n"               \
    "  sub $16, %rsp\n"                                     \
    "  mov %rdi, %r12\n  mov %rsi, %r13\n  xor %ebx, %ebx\n" \
    setup                                                   \
    ".globl slot_" #name "_b0\n"                            \
    "slot_" #name "_b0:\n"                                  \
    "1: mov %rbx, %rdi\n"                                   \
    ".globl slot_" #name "_b1\n"                            \
    "slot_" #name "_b1:\n"                                  \
    "  mov (%r12), %rax\n"                                  \
    ".globl slot_" #name "_b2\n"                            \
    "slot_" #name "_b2:\n"                                  \
    "  mov %rdi, %rsi\n"                                    \
    ".globl slot_" #name "_b3\n"                            \
    "slot_" #name "_b3:\n"                                  \
    "  " call "\n"                                          \
    ".globl slot_" #name "_ret\n"                           \
    "slot_" #name "_ret:\n"                                 \
    "  add %rax, %rbx\n"                                    \
    ".globl slot_" #name "_b5\n"                            \
    "slot_" #name "_b5:\n"                                  \
    "  dec %r13\n"                                          \
    ".globl slot_" #name "_b6\n"                            \
    "slot_" #name "_b6:\n"                                  \
    "  jnz 1b\n"                                            \
    ".globl slot_" #name "_end\n"                           \
    "slot_" #name "_end:\n"                                 \
    teardown                                                \
    "  mov %rbx, %rax\n"                                    \
    "  add $16, %rsp\n"                                     \
    "  pop %r13\n  pop %r12\n  pop %rbx\n"                  \
    "  ret\n"

__asm__(
    ".text\n"
    LOOP(disp8, "", "call *0x10(%rax)", "")
    LOOP(disp32, "", "call *0x100(%rax)", "")
    LOOP(rip, "", "call *slot_fn(%rip)", "")
    LOOP(rsp, "  mov slot_fn(%rip), %rax\n  mov %rax, (%rsp)\n", "call *(%rsp)", "")
);

#define DECLARE(name)                                                              \
    long slot_##name(struct ops *volatile *, long);                                \
    extern const char slot_##name##_b0[], slot_##name##_b1[], slot_##name##_b2[],  \
        slot_##name##_b3[], slot_##name##_ret[], slot_##name##_b5[],              \
        slot_##name##_b6[], slot_##name##_end[];
DECLARE(disp8) DECLARE(disp32) DECLARE(rip) DECLARE(rsp)

struct loop {
    const char *name;
    long (*run)(struct ops *volatile *, long);
    const char *bounds[8];
};
#define LOOP_OF(n) { #n, slot_##n, { slot_##n##_b0, slot_##n##_b1, slot_##n##_b2, slot_##n##_b3, \
                                     slot_##n##_ret, slot_##n##_b5, slot_##n##_b6, slot_##n##_end } }
static const struct loop loops[] = { LOOP_OF(disp8), LOOP_OF(disp32), LOOP_OF(rip), LOOP_OF(rsp) };
#define NLOOPS (sizeof loops / sizeof loops[0])

static __thread const struct loop *current;
static __thread long wrong;
static volatile sig_atomic_t off_boundary, deliveries;

__attribute__((noinline)) long callee(long x)
{
    if (current && __builtin_return_address(0) != (void *)current->bounds[4])
        wrong++;
    return 1 + (x & 0);
}

static void on_alarm(int sig, siginfo_t *info, void *context)
{
    (void)sig; (void)info;
    ucontext_t *uc = context;
    const char *rip = (const char *)uc->uc_mcontext.gregs[REG_RIP];
    for (size_t i = 0; i < NLOOPS; i++) {
        const struct loop *l = &loops[i];
        if (rip < l->bounds[0] || rip >= l->bounds[7])
            continue;
        int at_boundary = 0;
        for (int b = 0; b < 8; b++)
            at_boundary |= rip == l->bounds[b];
        if (!at_boundary)
            off_boundary++;
        /* rax is dead at the loop head and at the add's result: reloaded first. */
        if ((++deliveries & 15) == 0 && rip == l->bounds[1])
            uc->uc_mcontext.gregs[REG_RAX] = 0x5a5a;
    }
}

struct job { const struct loop *loop; long calls, wrong; };

static void *run_loop(void *arg)
{
    struct job *job = arg;
    current = job->loop;
    wrong = 0;
    job->calls = job->loop->run(&ops_ptr, ROUNDS);
    job->wrong = wrong;
    current = NULL;
    return NULL;
}

int main(int argc, char **argv)
{
    (void)argv;
    int threads = argc > 1 ? 3 : 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = { { 0, 500 }, { 0, 500 } };
    setitimer(ITIMER_REAL, &every, NULL);
    for (size_t i = 0; i < NLOOPS; i++) {
        struct job jobs[4] = { { &loops[i], 0, 0 }, { &loops[i], 0, 0 }, { &loops[i], 0, 0 }, { &loops[i], 0, 0 } };
        pthread_t tids[3];
        for (int t = 0; t < threads; t++)
            pthread_create(&tids[t], NULL, run_loop, &jobs[t + 1]);
        run_loop(&jobs[0]);
        for (int t = 0; t < threads; t++) {
            pthread_join(tids[t], NULL);
            if (jobs[t + 1].calls != jobs[0].calls)
                jobs[0].wrong++;
            jobs[0].wrong += jobs[t + 1].wrong;
        }
        printf("%s: %ld calls, %ld wrong returns\n", loops[i].name, jobs[0].calls, jobs[0].wrong);
    }
    struct itimerval stop = { { 0, 0 }, { 0, 0 } };
    setitimer(ITIMER_REAL, &stop, NULL);
    printf("rip off a boundary: %d\n", (int)off_boundary);
    return 0;
}
