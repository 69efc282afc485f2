/*
 * selfread -- a program that reads its own machine code.
 *
 * Exercises: code-integrity transparency.  `probe` (a top-level asm function
 * between global labels probe_start and probe_end) contains, among ordinary
 * instructions, a `syscall` (getpid), a `cpuid` (leaf 0, rbx saved and
 * restored) and an indirect `call *%rax` to a tiny leaf function.  A
 * virtualizer that patches those instructions in place must still show the
 * original bytes to plain data reads.  main calls probe once (so any lazy
 * patching has happened), then dumps [probe_start, probe_end) through a
 * volatile pointer and prints its 32-bit FNV-1a hash.
 * Expected: "probe result: 42", the byte dump and hash (fixed for a given
 * build), exit 0.
 */
#include <stdint.h>
#include <stdio.h>

extern const unsigned char probe_start[], probe_end[];
extern long probe(void);

__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl probe_start, probe_end, probe\n"
    ".type probe, @function\n"
    "probe_start:\n"
    "probe:\n"
    "    push  %rbx\n"
    "    push  %r12\n"
    "    mov   $39, %eax\n"              /* getpid */
    "    syscall\n"
    "    test  %eax, %eax\n"
    "    setg  %r12b\n"                  /* r12b = (pid > 0) */
    "    movzbl %r12b, %r12d\n"
    "    xor   %eax, %eax\n"             /* cpuid leaf 0 */
    "    xor   %ecx, %ecx\n"
    "    cpuid\n"
    "    xor   %edx, %edx\n"
    "    cmp   $1, %eax\n"
    "    setae %dl\n"                    /* dl = (max leaf >= 1) */
    "    add   %edx, %r12d\n"
    "    lea   probe_leaf(%rip), %rax\n"
    "    call  *%rax\n"                  /* indirect call, returns 40 */
    "    add   %r12, %rax\n"             /* 40 + 1 + 1 = 42 */
    "    pop   %r12\n"
    "    pop   %rbx\n"
    "    ret\n"
    ".size probe, . - probe\n"
    "probe_leaf:\n"
    "    mov   $40, %eax\n"
    "    ret\n"
    "probe_end:\n"
);

int main(void)
{
    long r = probe();
    printf("probe result: %ld\n", r);

    const volatile unsigned char *p = probe_start;
    size_t n = (size_t)(probe_end - probe_start);
    uint32_t h = 0x811c9dc5u;

    printf("probe bytes:");
    for (size_t i = 0; i < n; i++) {
        unsigned char b = p[i];
        printf(" %02x", b);
        h = (h ^ b) * 0x01000193u;
    }
    printf("\n");
    printf("probe sum: 0x%08x\n", h);
    return 0;
}
