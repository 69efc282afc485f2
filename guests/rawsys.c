/*
 * rawsys -- raw system calls with no libc at all.
 *
 * Exercises: the very first instructions of a static, non-PIE, libc-free
 * process; plain `syscall` instructions (write, getpid, uname, exit_group)
 * issued directly from _start.  Kept tiny on purpose: a test single-steps
 * the whole program.  Output is fixed text only (the pid is never printed).
 * Expected: stdout "raw: hello\nraw: pid ok\nraw: sysname Linux\n", exit 0.
 */

#define SYS_write      1
#define SYS_getpid     39
#define SYS_uname      63
#define SYS_exit_group 231

static inline long sys1(long nr, long a)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "0"(nr), "D"(a)
                      : "rcx", "r11", "memory");
    return ret;
}

static inline long sys3(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "0"(nr), "D"(a), "S"(b), "d"(c)
                      : "rcx", "r11", "memory");
    return ret;
}

#define SAY(s) sys3(SYS_write, 1, (long)(s), sizeof(s) - 1)

__attribute__((noreturn, used)) void raw_main(void)
{
    char uts[6 * 65];               /* struct utsname: 6 fields of 65 bytes */

    SAY("raw: hello\n");
    if (sys1(SYS_getpid, 0) > 0)
        SAY("raw: pid ok\n");
    if (sys1(SYS_uname, (long)uts) == 0 &&
        uts[0] == 'L' && uts[1] == 'i' && uts[2] == 'n' &&
        uts[3] == 'u' && uts[4] == 'x' && uts[5] == '\0')
        SAY("raw: sysname Linux\n");
    sys1(SYS_exit_group, 0);
    __builtin_unreachable();
}

/* Entry point: align the stack as the C ABI expects and enter raw_main. */
__asm__(
    ".text\n"
    ".globl _start\n"
    ".type _start, @function\n"
    "_start:\n"
    "    xor  %ebp, %ebp\n"
    "    and  $-16, %rsp\n"
    "    call raw_main\n"
    "    hlt\n"
    ".size _start, . - _start\n"
);
