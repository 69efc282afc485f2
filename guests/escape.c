/*
 * escape -- a syscall the static scanner cannot see.
 *
 * Exercises: an instruction stream hidden inside another instruction.  The
 * ordinary instruction `movabs $imm64, %rax` at label `hidden` has the
 * immediate bytes 0f 05 c3 90 90 90 90 90, i.e. `syscall; ret` followed by
 * nops.  A linear disassembler sees only the movabs.  The movabs is first
 * executed normally (harmless: it just loads rax).  Later the program pushes
 * a return address and the address hidden+2, and executes `ret`, landing on
 * the hidden `syscall` with rax=1 (write), rdi=1, rsi=msg, rdx=len.  The
 * hidden `ret` then returns to `after`, which writes a second message with a
 * normal syscall and exits 0.
 * Expected: stdout "escape: hidden write\nescape: done\n", exit 0.
 *
 * Everything lives in one top-level asm block so the layout is exact.
 */

__asm__(
    ".text\n"
    ".globl _start\n"
    ".type _start, @function\n"
    "_start:\n"
    "hidden:\n"
    /* 48 b8 0f 05 c3 90 90 90 90 90 */
    "    movabsq $0x9090909090c3050f, %rax\n"
    "    mov   $1, %eax\n"                   /* SYS_write          */
    "    mov   $1, %edi\n"                   /* fd 1               */
    "    lea   msg_hidden(%rip), %rsi\n"
    "    mov   $msg_hidden_len, %edx\n"
    "    lea   after(%rip), %rcx\n"
    "    push  %rcx\n"                       /* where the hidden ret goes */
    "    lea   hidden+2(%rip), %rcx\n"
    "    push  %rcx\n"
    "    ret\n"                              /* -> hidden syscall; ret    */
    "after:\n"
    "    mov   $1, %eax\n"
    "    mov   $1, %edi\n"
    "    lea   msg_done(%rip), %rsi\n"
    "    mov   $msg_done_len, %edx\n"
    "    syscall\n"
    "    mov   $231, %eax\n"                 /* SYS_exit_group     */
    "    xor   %edi, %edi\n"
    "    syscall\n"
    "    hlt\n"
    ".size _start, . - _start\n"
    "\n"
    ".section .rodata\n"
    "msg_hidden: .ascii \"escape: hidden write\\n\"\n"
    ".set msg_hidden_len, . - msg_hidden\n"
    "msg_done: .ascii \"escape: done\\n\"\n"
    ".set msg_done_len, . - msg_done\n"
    ".text\n"
);
