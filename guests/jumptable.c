/*
 * jumptable [ROUNDS [keep]] -- an interpreter that dispatches through a read-only jump table.
 *
 * Exercises: table jumps a scanner can prove (CPython's computed gotos).  Each
 * handler ends in a dispatch on the next opcode byte, in one of the two shapes
 *     movzx eax, sil; mov rax, [rax*8 + table]; jmp rax
 *     movzx eax, byte ptr [rdi - 1]; jmp [rax*8 + table]
 * through a 256-entry table in .rodata: a virtualizer may run these unchecked,
 * as long as the table cannot change.  Then the program changes it: it makes
 * the table's page writable, points opcode 2 at another handler, makes it
 * read-only again, and runs the program once more, which must now compute
 * what the new table says ("keep": the table stays as it is, and the program
 * ends after the first line).
 * Expected (exit 0):
 *   run: <acc> after <n> rounds
 *   forged: <acc>
 *   bad opcode: -1
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* long interp(const unsigned char *program): the accumulator at opcode 0. */
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl interp\n"
    "interp:\n"
    "  xor %edx, %edx\n"
    "  movzbl (%rdi), %esi\n"
    "  add $1, %rdi\n"
    "  movzbl %sil, %eax\n"
    "  mov jt_table(,%rax,8), %rax\n"
    "  jmp *%rax\n"
    "op_halt:\n"
    "  mov %rdx, %rax\n"
    "  ret\n"
    "op_inc:\n"
    "  add $1, %rdx\n"
    "  movzbl (%rdi), %esi\n"
    "  add $1, %rdi\n"
    "  movzbl %sil, %eax\n"
    "  mov jt_table(,%rax,8), %rax\n"
    "  jmp *%rax\n"
    "op_double:\n"
    "  add %rdx, %rdx\n"
    "  lea 1(%rdi), %rdi\n"
    "  movzbl -1(%rdi), %eax\n"
    "  jmp *jt_table(,%rax,8)\n"
    "op_add7:\n"
    "  add $7, %rdx\n"
    "  movzbl (%rdi), %esi\n"
    "  add $1, %rdi\n"
    "  movzbl %sil, %eax\n"
    "  mov jt_table(,%rax,8), %rax\n"
    "  jmp *%rax\n"
    "op_mask:\n"
    "  and $0xffffff, %rdx\n"
    "  lea 1(%rdi), %rdi\n"
    "  movzbl -1(%rdi), %eax\n"
    "  jmp *jt_table(,%rax,8)\n"
    "op_bad:\n"
    "  mov $-1, %rax\n"
    "  ret\n"
    ".section .rodata\n"
    ".p2align 12\n"
    ".globl jt_table\n"
    "jt_table:\n"
    "  .quad op_halt, op_inc, op_double, op_add7, op_mask\n"
    "  .rept 251\n"
    "  .quad op_bad\n"
    "  .endr\n"
    ".p2align 12\n"
    ".text\n"
);

long interp(const unsigned char *program);
extern const void *jt_table[256];

#define LENGTH 1000

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 20000;
    static unsigned char program[LENGTH + 1];
    uint32_t seed = 12345;
    for (int i = 0; i < LENGTH; i++) {
        seed = seed * 1103515245 + 12345;
        program[i] = 1 + (seed >> 16) % 4;
    }
    program[LENGTH] = 0;

    long acc = 0;
    for (int round = 0; round < rounds; round++)
        acc ^= interp(program) + round;
    printf("run: %ld after %d rounds\n", acc, rounds);

    if (argc > 2 && strcmp(argv[2], "keep") == 0)
        return 0;

    /* The table changes: opcode 2 now adds 7. */
    long page = sysconf(_SC_PAGESIZE);
    void *table_page = (void *)((uintptr_t)jt_table & ~(uintptr_t)(page - 1));
    if (mprotect(table_page, page, PROT_READ | PROT_WRITE) != 0) {
        perror("mprotect");
        return 1;
    }
    ((const void **)jt_table)[2] = jt_table[3];
    if (mprotect(table_page, page, PROT_READ) != 0) {
        perror("mprotect");
        return 1;
    }
    printf("forged: %ld\n", interp(program));

    static const unsigned char bad[] = {1, 1, 200, 0};
    printf("bad opcode: %ld\n", interp(bad));
    return 0;
}
