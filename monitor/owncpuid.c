/* CPUID faulting for sbe's own thread, with a net for its own cpuid instructions.
 *
 * The kernel keeps CPUID faulting per task and writes the CPU's
 * MSR_MISC_FEATURES_ENABLES at every context switch between a task that has it and
 * one that has not. Under a hypervisor that write traps to the host: with the guest
 * armed and sbe not, each ptrace stop (two switches) cost 38 us instead of 9 on the
 * machine this was measured on. Armed in sbe's thread too, the switches between the
 * two write nothing.
 *
 * sbe's Python, the libraries it loads and ld.so then fault on their own cpuid
 * (OpenSSL's and liblzma's feature probes, glibc's cache-size queries). The handler
 * answers such a fault itself: faulting off, cpuid, faulting on, the answer in the
 * registers and rip past the instruction. Any other SIGSEGV goes back to the
 * disposition there was before, and faults again there.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

static struct sigaction previous;

static void on_segv(int sig, siginfo_t *info, void *context)
{
    greg_t *g = ((ucontext_t *)context)->uc_mcontext.gregs;
    /* A cpuid fault is a general protection fault (SI_KERNEL), so rip is code. */
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        unsigned int a, b, c, d;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        __cpuid_count((unsigned int)g[REG_RAX], (unsigned int)g[REG_RCX], a, b, c, d);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        g[REG_RAX] = a;
        g[REG_RBX] = b;
        g[REG_RCX] = c;
        g[REG_RDX] = d;
        g[REG_RIP] += 2;
        return;
    }
    (void)sig;
    sigaction(SIGSEGV, &previous, NULL);
}

/* Arm CPUID faulting for the calling thread, its own cpuid answered by the
 * handler. 0 when armed; -1 (nothing changed) when the CPU or kernel has none. */
int sbe_own_cpuid_faulting(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &previous) != 0)
        return -1;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        sigaction(SIGSEGV, &previous, NULL);
        return -1;
    }
    return 0;
}

/* Undo sbe_own_cpuid_faulting: cpuid runs again, the SIGSEGV disposition is the
 * one before (for a caller that runs sbe in its own process, such as a test). */
void sbe_own_cpuid_faulting_off(void)
{
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    sigaction(SIGSEGV, &previous, NULL);
}
