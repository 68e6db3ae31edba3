package tvserve.plugin;

import io.netty.util.ReferenceCounted;
import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.AbstractExecutorService;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkLoadManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Keeps a plugin request's body alive until the plugin has read it.
 *
 * <p>TorchServe 0.12 runs a plugin endpoint on its worker-manager thread pool, but Netty releases
 * the request (a SimpleChannelInboundHandler) as soon as the event loop has queued that task, so a
 * POST body is often gone ("IllegalReferenceCountException") when the endpoint reads it. This
 * wraps that pool once the model manager exists: a task submitted by a plugin endpoint
 * (HttpRequestHandlerChain's lambda) has the request it captured retained on the submitting event
 * loop, before Netty's release, and released after the task ran.
 */
final class BodyKeeper extends AbstractExecutorService {
    private static final Logger logger = LoggerFactory.getLogger(BodyKeeper.class);
    private static final String ENDPOINT_TASK = "HttpRequestHandlerChain$$Lambda";
    private static volatile boolean installed;

    private final ExecutorService delegate;

    private BodyKeeper(ExecutorService delegate) {
        this.delegate = delegate;
    }

    /** Installs the wrapper from a daemon thread as soon as TorchServe has made its model manager. */
    static synchronized void installSoon() {
        if (installed) {
            return;
        }
        installed = true;
        Thread thread = new Thread(() -> {
            try {
                while (ModelManager.getInstance() == null) {
                    Thread.sleep(5);
                }
                install();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            } catch (ReflectiveOperationException e) {
                logger.error("tvserve plugin: cannot keep request bodies; POSTs to /v2 and /v1 may fail", e);
            }
        }, "tvserve-body-keeper");
        thread.setDaemon(true);
        thread.start();
    }

    private static void install() throws ReflectiveOperationException {
        Field wlmField = ModelManager.class.getDeclaredField("wlm");
        wlmField.setAccessible(true);
        WorkLoadManager wlm = (WorkLoadManager) wlmField.get(ModelManager.getInstance());
        Field poolField = WorkLoadManager.class.getDeclaredField("threadPool");
        poolField.setAccessible(true);
        poolField.set(wlm, new BodyKeeper((ExecutorService) poolField.get(wlm)));
        logger.info("tvserve plugin: request bodies are kept for plugin endpoints");
    }

    @Override
    public void execute(Runnable task) {
        List<ReferenceCounted> held = retainCaptured(task);
        if (held.isEmpty()) {
            delegate.execute(task);
            return;
        }
        delegate.execute(() -> {
            try {
                task.run();
            } finally {
                held.forEach(ReferenceCounted::release);
            }
        });
    }

    private static List<ReferenceCounted> retainCaptured(Runnable task) {
        List<ReferenceCounted> held = new ArrayList<>();
        if (!task.getClass().getName().contains(ENDPOINT_TASK)) {
            return held;
        }
        for (Field field : task.getClass().getDeclaredFields()) {
            try {
                field.setAccessible(true);
                Object value = field.get(task);
                if (value instanceof ReferenceCounted && ((ReferenceCounted) value).refCnt() > 0) {
                    held.add(((ReferenceCounted) value).retain());
                }
            } catch (ReflectiveOperationException | RuntimeException e) {
                logger.warn("tvserve plugin: cannot read a captured value of {}", task.getClass(), e);
            }
        }
        return held;
    }

    @Override
    public void shutdown() {
        delegate.shutdown();
    }

    @Override
    public List<Runnable> shutdownNow() {
        return delegate.shutdownNow();
    }

    @Override
    public boolean isShutdown() {
        return delegate.isShutdown();
    }

    @Override
    public boolean isTerminated() {
        return delegate.isTerminated();
    }

    @Override
    public boolean awaitTermination(long timeout, TimeUnit unit) throws InterruptedException {
        return delegate.awaitTermination(timeout, unit);
    }
}
