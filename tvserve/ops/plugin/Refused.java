package tvserve.plugin;

/**
 * A start-up check that failed: thrown from a plugin constructor, it propagates out of TorchServe's
 * ModelServer.main, which exits 1, so the server never runs with a setting the operator did not ask
 * for (SuppliedKeys, ConsoleAddress). No stack trace: the message, which says what to do, ends
 * TorchServe's console output.
 */
final class Refused extends IllegalStateException {
    Refused(String message) {
        super(message);
    }

    @Override
    public synchronized Throwable fillInStackTrace() {
        return this;
    }
}
