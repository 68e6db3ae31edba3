package tvserve.plugin;

import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.util.ReferenceCounted;
import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.AbstractExecutorService;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.TimeUnit;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkLoadManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Wraps the thread pool TorchServe 0.12 runs plugin endpoints on, for two of its SDK's faults.
 *
 * <p>Netty releases the request (a SimpleChannelInboundHandler) as soon as the event loop has
 * queued the endpoint's task, so a POST body is often gone ("IllegalReferenceCountException") when
 * the endpoint reads it: a task submitted for a plugin endpoint (HttpRequestHandlerChain's lambda)
 * has the request it captured retained on the submitting event loop, before Netty's release, and
 * released after the task ran. And the SDK answers any method but GET, PUT, POST and DELETE with a
 * 500: those get a 405 {"error"} here instead. Installed once the model manager exists.
 */
final class EndpointPool extends AbstractExecutorService {
    private static final Logger logger = LoggerFactory.getLogger(EndpointPool.class);
    private static final java.util.Set<HttpMethod> SDK_METHODS =
            java.util.Set.of(HttpMethod.GET, HttpMethod.PUT, HttpMethod.POST, HttpMethod.DELETE);
    private static final String ENDPOINT_TASK = "HttpRequestHandlerChain$$Lambda";
    private static volatile boolean installed;

    private final ExecutorService delegate;

    private EndpointPool(ExecutorService delegate) {
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
        }, "tvserve-endpoint-pool");
        thread.setDaemon(true);
        thread.start();
    }

    private static void install() throws ReflectiveOperationException {
        Field wlmField = ModelManager.class.getDeclaredField("wlm");
        wlmField.setAccessible(true);
        WorkLoadManager wlm = (WorkLoadManager) wlmField.get(ModelManager.getInstance());
        Field poolField = WorkLoadManager.class.getDeclaredField("threadPool");
        poolField.setAccessible(true);
        poolField.set(wlm, new EndpointPool((ExecutorService) poolField.get(wlm)));
        logger.info("tvserve plugin: request bodies are kept for plugin endpoints");
    }

    @Override
    public void execute(Runnable task) {
        if (answeredUnsupportedMethod(task)) {
            return;
        }
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

    /** A plugin task for a method the SDK cannot run: answered 405 at once, and not run. */
    private static boolean answeredUnsupportedMethod(Runnable task) {
        FullHttpRequest req = captured(task, FullHttpRequest.class);
        ChannelHandlerContext ctx = captured(task, ChannelHandlerContext.class);
        if (req == null || ctx == null || SDK_METHODS.contains(req.method())) {
            return false;
        }
        String body = "{\"error\":\"" + req.method() + " is not allowed here: GET metadata, POST inference.\"}";
        NettyUtils.sendJsonResponse(ctx, body, HttpResponseStatus.METHOD_NOT_ALLOWED);
        return true;
    }

    /** The values a plugin endpoint's task captured (its fields); none for any other task. */
    private static List<Object> capturedValues(Runnable task) {
        List<Object> values = new ArrayList<>();
        if (!task.getClass().getName().contains(ENDPOINT_TASK)) {
            return values;
        }
        for (Field field : task.getClass().getDeclaredFields()) {
            try {
                field.setAccessible(true);
                values.add(field.get(task));
            } catch (ReflectiveOperationException | RuntimeException e) {
                logger.warn("tvserve plugin: cannot read a captured value of {}", task.getClass(), e);
            }
        }
        return values;
    }

    /** The value of `type` that a plugin endpoint's task captured, or null (any other task). */
    private static <T> T captured(Runnable task, Class<T> type) {
        for (Object value : capturedValues(task)) {
            if (type.isInstance(value)) {
                return type.cast(value);
            }
        }
        return null;
    }

    /** The task's captured buffers that are still live, each retained once (released by the caller). */
    private static List<ReferenceCounted> retainCaptured(Runnable task) {
        List<ReferenceCounted> held = new ArrayList<>();
        for (Object value : capturedValues(task)) {
            if (value instanceof ReferenceCounted && ((ReferenceCounted) value).refCnt() > 0) {
                held.add(((ReferenceCounted) value).retain());
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
