/*
 * sigcontext -- the RIP a signal handler sees in its ucontext.
 *
 * Exercises: the register state the kernel saves for a signal handler.  A
 * virtualizer that patches sensitive instructions (e.g. redirects a
 * `syscall` into a trampoline) or single-steps/emulates them must still
 * present the guest with the RIP the native program would have: in the
 * program's own code, at the right instruction -- never in a trampoline,
 * an injected page or the monitor.  Two cases:
 *   1. SIGUSR1 raised with kill(getpid(), SIGUSR1) where both getpid and
 *      kill are raw `syscall` instructions in hand-written asm; the signal
 *      is delivered on return from the kill syscall, so the saved RIP must
 *      be the instruction right after that `syscall` (label
 *      sc_after_syscall).
 *   2. SIGSEGV from a load from address 0x10 in a known asm function; the
 *      saved RIP must be the faulting load itself (label sc_fault_insn).
 *      The handler then leaves with siglongjmp.
 * Each handler checks that RIP lies in an executable, file-backed mapping
 * of /proc/self/maps (perms with 'x', a path that is not "[...]").  The
 * handlers use only async-signal-safe calls (open/read/close/write/getpid),
 * and all output goes through write(2), so the order is fixed.
 * Expected (exit 0):
 *   SIGUSR1 rip in module: yes
 *   SIGUSR1 rip right after syscall: yes
 *   SIGUSR1 sent by self (SI_USER): yes
 *   SIGSEGV rip in module: yes
 *   SIGSEGV rip at faulting instruction: yes
 *   SIGSEGV si_addr: 0x10
 *   sigcontext: done
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

#define BAD_ADDR 0x10

/*
 * long sc_kill_self(int sig): raw getpid, then raw kill(pid, sig).
 * long sc_load(const long *p): a single load at sc_fault_insn.
 * Top-level asm so the labels are exactly where they must be.
 */
__asm__(
    ".text\n"
    ".globl sc_kill_self\n"
    ".hidden sc_kill_self\n"
    ".type sc_kill_self, @function\n"
    "sc_kill_self:\n"
    "    movl %edi, %esi\n"           /* sig */
    "    movl $39, %eax\n"            /* __NR_getpid */
    "    syscall\n"
    "    movq %rax, %rdi\n"           /* pid */
    "    movl $62, %eax\n"            /* __NR_kill */
    "    syscall\n"
    ".globl sc_after_syscall\n"
    ".hidden sc_after_syscall\n"
    "sc_after_syscall:\n"
    "    ret\n"
    ".size sc_kill_self, .-sc_kill_self\n"
    "\n"
    ".globl sc_load\n"
    ".hidden sc_load\n"
    ".type sc_load, @function\n"
    "sc_load:\n"
    ".globl sc_fault_insn\n"
    ".hidden sc_fault_insn\n"
    "sc_fault_insn:\n"
    "    movq (%rdi), %rax\n"
    "    ret\n"
    ".size sc_load, .-sc_load\n"
);

long sc_kill_self(int sig);
long sc_load(const long *p);
extern const char sc_after_syscall[];
extern const char sc_fault_insn[];

static sigjmp_buf segv_env;

/* ---- async-signal-safe output -------------------------------------- */
static void out(const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(1, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void out_line(const char *prefix, const char *what, int yes)
{
    out(prefix);
    out(what);
    out(yes ? "yes\n" : "no\n");
}

static void out_hex(uint64_t v)
{
    char buf[19];
    int i = 18;
    buf[i] = '\0';
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i > 2);
    buf[--i] = 'x';
    buf[--i] = '0';
    out(buf + i);
}

/* ---- /proc/self/maps lookup, async-signal-safe ---------------------- */
static const char *parse_hex(const char *p, uint64_t *v)
{
    uint64_t x = 0;
    for (;; p++) {
        char c = *p;
        if (c >= '0' && c <= '9')
            x = x * 16 + (uint64_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            x = x * 16 + (uint64_t)(c - 'a' + 10);
        else
            break;
    }
    *v = x;
    return p;
}

static const char *skip_field(const char *p)
{
    while (*p == ' ')
        p++;
    while (*p && *p != ' ')
        p++;
    return p;
}

/* 1 if the line "start-end perms offset dev inode path" covers addr with
 * an executable, file-backed mapping. */
static int line_matches(const char *line, uint64_t addr)
{
    uint64_t start, end;
    const char *p = parse_hex(line, &start);
    if (*p != '-')
        return 0;
    p = parse_hex(p + 1, &end);
    if (*p != ' ' || addr < start || addr >= end)
        return 0;
    p++;
    if (strlen(p) < 4 || p[2] != 'x')
        return 0;
    p = skip_field(p);      /* perms */
    p = skip_field(p);      /* offset */
    p = skip_field(p);      /* dev */
    p = skip_field(p);      /* inode */
    while (*p == ' ')
        p++;
    return *p != '\0' && *p != '[';
}

static int in_file_exec_mapping(uint64_t addr)
{
    static char line[4096];
    char chunk[1024];
    size_t len = 0;
    int found = 0;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n <= 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            if (chunk[i] == '\n') {
                line[len] = '\0';
                if (line_matches(line, addr))
                    found = 1;
                len = 0;
            } else if (len < sizeof line - 1) {
                line[len++] = chunk[i];
            }
        }
    }
    if (len > 0) {
        line[len] = '\0';
        if (line_matches(line, addr))
            found = 1;
    }
    close(fd);
    return found;
}

/* ---- handlers ------------------------------------------------------- */
static void on_usr1(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;
    uint64_t rip = (uint64_t)uc->uc_mcontext.gregs[REG_RIP];
    (void)sig;
    out_line("SIGUSR1 ", "rip in module: ", in_file_exec_mapping(rip));
    out_line("SIGUSR1 ", "rip right after syscall: ",
             rip == (uint64_t)(uintptr_t)sc_after_syscall);
    out_line("SIGUSR1 ", "sent by self (SI_USER): ",
             si->si_code == SI_USER && si->si_pid == getpid());
}

static void on_segv(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;
    uint64_t rip = (uint64_t)uc->uc_mcontext.gregs[REG_RIP];
    (void)sig;
    out_line("SIGSEGV ", "rip in module: ", in_file_exec_mapping(rip));
    out_line("SIGSEGV ", "rip at faulting instruction: ",
             rip == (uint64_t)(uintptr_t)sc_fault_insn);
    out("SIGSEGV si_addr: ");
    out_hex((uint64_t)(uintptr_t)si->si_addr);
    out("\n");
    siglongjmp(segv_env, 1);
}

int main(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO;
    sa.sa_sigaction = on_usr1;
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        return 2;
    sa.sa_sigaction = on_segv;
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        return 2;

    if (sc_kill_self(SIGUSR1) != 0) {
        out("kill failed\n");
        return 2;
    }

    if (sigsetjmp(segv_env, 1) == 0) {
        volatile long v = sc_load((const long *)BAD_ADDR);
        (void)v;
        out("SIGSEGV not raised\n");
        return 1;
    }

    out("sigcontext: done\n");
    return 0;
}
