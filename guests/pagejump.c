/*
 * pagejump -- code entered from another page at an offset its own first entry
 * does not lead to.
 *
 * Exercises: a page's scan records the entries its direct branches give other
 * pages, and a page planted from the scan cache must give them too. The first
 * page holds `_start`; with no argument it exits 0 at once, so a run records the
 * first page (and its jumps into the second) but never runs the second. With an
 * argument it jumps into the second page at `enter`, which jumps straight back,
 * and then to `hidden` in the second page, where a `write` syscall sits behind
 * bytes that decode as nothing (so a scan from `enter` alone never reaches it).
 * Expected: no argument: no output, exit 0; an argument: "pagejump: hidden\n",
 * exit 0.
 */

__asm__(
    ".text\n"
    ".globl _start\n"
    ".type _start, @function\n"
    "_start:\n"
    "    cmpq  $1, (%rsp)\n"                /* argc */
    "    je    leave\n"
    "    jmp   enter\n"
    "back:\n"
    "    jmp   hidden\n"
    "leave:\n"
    "    mov   $231, %eax\n"                /* SYS_exit_group */
    "    xor   %edi, %edi\n"
    "    syscall\n"
    "    hlt\n"
    ".balign 4096\n"
    "enter:\n"
    "    jmp   back\n"
    "    .byte 0x06, 0x06, 0x06, 0x06\n"     /* no instruction in 64-bit mode */
    "hidden:\n"
    "    mov   $1, %eax\n"                  /* SYS_write */
    "    mov   $1, %edi\n"
    "    lea   msg(%rip), %rsi\n"
    "    mov   $msg_len, %edx\n"
    "    syscall\n"
    "    mov   $231, %eax\n"
    "    xor   %edi, %edi\n"
    "    syscall\n"
    "    hlt\n"
    ".size _start, . - _start\n"
    "\n"
    ".section .rodata\n"
    "msg: .ascii \"pagejump: hidden\\n\"\n"
    ".set msg_len, . - msg\n"
    ".text\n"
);
