/* startup: does nothing; measures a runner's start-up and exit cost. */
int main(void)
{
    return 0;
}
