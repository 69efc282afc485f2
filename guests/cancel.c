/*
 * cancel -- pthread_cancel of threads blocked in cancellation points.
 *
 * Exercises: glibc thread cancellation, which sends the internal SIGCANCEL
 * (a real-time signal) to a thread blocked in a system call; the signal
 * handler sees the thread is at a cancellation point and unwinds it
 * (running cleanup handlers) instead of returning into the syscall.  A
 * virtualizer must deliver a signal to the right thread, interrupt its
 * blocking syscall, and report a RIP/syscall state glibc recognises as
 * "inside a cancellable syscall".  Two threads, one looping in pause(),
 * one looping in sleep(); each is cancelled only after the main thread has
 * seen it start (a semaphore, no sleeping in main), then joined.
 * Expected (exit 0):
 *   pause thread: joined, result is PTHREAD_CANCELED: yes, cleanup ran: yes
 *   sleep thread: joined, result is PTHREAD_CANCELED: yes, cleanup ran: yes
 *   cancel: done
 */
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <unistd.h>

static sem_t started;
static volatile int cleanup_ran[2];

static void cleanup(void *arg)
{
    cleanup_ran[(long)arg] = 1;
}

static void *pause_thread(void *arg)
{
    pthread_cleanup_push(cleanup, arg);
    sem_post(&started);
    for (;;)
        pause();
    pthread_cleanup_pop(0);
    return NULL;
}

static void *sleep_thread(void *arg)
{
    pthread_cleanup_push(cleanup, arg);
    sem_post(&started);
    for (;;)
        sleep(1000);
    pthread_cleanup_pop(0);
    return NULL;
}

static int run(const char *name, void *(*fn)(void *), long idx)
{
    pthread_t t;
    void *res = NULL;

    if (pthread_create(&t, NULL, fn, (void *)idx) != 0) {
        printf("%s thread: pthread_create failed\n", name);
        return 1;
    }
    while (sem_wait(&started) != 0)
        ;
    if (pthread_cancel(t) != 0) {
        printf("%s thread: pthread_cancel failed\n", name);
        return 1;
    }
    if (pthread_join(t, &res) != 0) {
        printf("%s thread: pthread_join failed\n", name);
        return 1;
    }
    int ok = res == PTHREAD_CANCELED && cleanup_ran[idx];
    printf("%s thread: joined, result is PTHREAD_CANCELED: %s, "
           "cleanup ran: %s\n", name,
           res == PTHREAD_CANCELED ? "yes" : "no",
           cleanup_ran[idx] ? "yes" : "no");
    return !ok;
}

int main(void)
{
    int failures = 0;

    if (sem_init(&started, 0, 0) != 0)
        return 2;
    failures += run("pause", pause_thread, 0);
    failures += run("sleep", sleep_thread, 1);
    printf("cancel: done\n");
    return failures ? 1 : 0;
}
