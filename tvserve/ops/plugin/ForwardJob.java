package tvserve.plugin;

import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;

/** An inference job whose answer is awaited by the plugin's thread instead of written to a channel. */
public class ForwardJob extends Job {
    /** What the worker (or TorchServe, on failure) answered. */
    static final class Answer {
        byte[] body;
        String contentType;
        int status;
        Map<String, String> headers;
    }

    private final CompletableFuture<Answer> answer = new CompletableFuture<>();

    public ForwardJob(String model, String version, WorkerCommands cmd, RequestInput input) {
        super(model, version, cmd, input);
    }

    @Override
    public void response(byte[] body, CharSequence contentType, int statusCode, String statusPhrase,
            Map<String, String> responseHeaders) {
        Answer a = new Answer();
        a.body = body == null ? new byte[0] : body;
        a.contentType = contentType == null ? "application/json" : contentType.toString();
        a.status = statusCode;
        a.headers = responseHeaders;
        answer.complete(a);
    }

    @Override
    public void sendError(int status, String error) {
        JsonObject body = new JsonObject();
        body.addProperty("error", error);
        Answer a = new Answer();
        a.body = ProtocolEndpoint.GSON.toJson(body).getBytes(StandardCharsets.UTF_8);
        a.contentType = "application/json";
        a.status = status;
        answer.complete(a);
    }

    @Override
    public boolean isOpen() {
        return !answer.isDone();
    }

    /** Waits up to `timeoutSeconds` for the answer and writes it to `rsp` (504 if none came). */
    void copyTo(Response rsp, int timeoutSeconds) throws IOException {
        Answer a;
        try {
            a = answer.get(Math.max(timeoutSeconds, 1), TimeUnit.SECONDS);
        } catch (TimeoutException | ExecutionException e) {
            ProtocolEndpoint.error(rsp, 504, "The model did not answer within " + timeoutSeconds + " s.");
            return;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            ProtocolEndpoint.error(rsp, 503, "The server is stopping; retry later.");
            return;
        }
        rsp.setStatus(a.status);
        rsp.setContentType(a.contentType);
        if (a.headers != null) {
            for (Map.Entry<String, String> header : a.headers.entrySet()) {
                rsp.setHeader(header.getKey(), header.getValue());
            }
        }
        rsp.getOutputStream().write(a.body);
    }
}
