/*
 * codecopy -- runs a copy of a page of its own code.
 *
 * Exercises: a guest that copies its code as data (V8 copies node's embedded
 * builtins into its code range at start-up).  The page below holds one
 * self-contained function: a raw getpid syscall and an indirect call to a
 * helper on the same page.  main runs it in place first (so a virtualizer has
 * patched the page by then), copies the page into an anonymous mapping, makes
 * that executable and runs the copy, which must behave as the original does.
 * Expected (exit 0):
 *   original: pid ok, helper ok
 *   copy: pid ok, helper ok
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* long copied(long x): getpid() + 1000 * helper(x), helper(x) = x + 1 */
__asm__(
    ".text\n"
    ".p2align 12\n"
    ".globl copied_page\n"
    "copied_page:\n"
    ".globl copied\n"
    "copied:\n"
    "  push %rbx\n"
    "  push %r12\n"
    "  push %r13\n"
    "  mov %rdi, %r12\n"
    "  mov $39, %eax\n"
    "  syscall\n"
    "  mov %rax, %rbx\n"
    "  mov %r12, %rdi\n"
    "  lea helper(%rip), %rax\n"
    "  call *%rax\n"
    "  imul $1000, %rax, %rax\n"
    "  add %rbx, %rax\n"
    "  pop %r13\n"
    "  pop %r12\n"
    "  pop %rbx\n"
    "  ret\n"
    "helper:\n"
    "  lea 1(%rdi), %rax\n"
    "  ret\n"
    ".p2align 12\n"
);

long copied(long x);
extern const char copied_page[];

static void report(const char *what, long (*fn)(long))
{
    long got = fn(41);
    long pid = getpid();
    printf("%s: pid %s, helper %s\n", what, got % 1000 == pid % 1000 ? "ok" : "wrong",
           (got - pid) / 1000 == 42 ? "ok" : "wrong");
}

int main(void)
{
    long page = sysconf(_SC_PAGESIZE);
    report("original", copied);
    char *copy = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (copy == MAP_FAILED)
        return 2;
    memcpy(copy, copied_page, page);
    if (mprotect(copy, page, PROT_READ | PROT_EXEC))
        return 3;
    report("copy", (long (*)(long))copy);
    return 0;
}
