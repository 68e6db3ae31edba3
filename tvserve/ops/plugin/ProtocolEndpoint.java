package tvserve.plugin;

import com.google.gson.Gson;
import com.google.gson.JsonObject;
import io.netty.handler.codec.http.FullHttpRequest;
import java.io.IOException;
import java.lang.reflect.Field;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.UUID;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.ModelVersionedRefs;

/**
 * What the protocol endpoints share: routing facts from TorchServe's model manager (which models
 * and versions exist, whether their workers are READY), forwarding a request to the model's
 * worker with headers naming the protocol and the action, and the {"error": ...} body.
 *
 * <p>The worker's handler (handlers/protocols/) decodes and encodes every model-level request;
 * this plugin only routes, and answers what only the frontend knows (health and readiness).
 */
public abstract class ProtocolEndpoint extends ModelServerEndpoint {
    static final String PROTOCOL_HEADER = "tvserve-protocol";
    static final String ACTION_HEADER = "tvserve-action";
    static final String VERSION_HEADER = "tvserve-model-version";
    static final String MODEL_HEADER = "tvserve-model-name";
    static final String ARRIVAL_HEADER = "tvserve-received-ms"; // the queue time metric (handlers/telemetry.py)
    static final Gson GSON = new com.google.gson.GsonBuilder().disableHtmlEscaping().create();

    /** Requests answered by the plugin itself with a 4xx (no model's worker saw them); no model label:
     *  an unknown model's name is the client's and would make series without bound. */
    static final io.prometheus.client.Counter REJECTED = io.prometheus.client.Counter.build()
            .name("tvserve_frontend_rejections_total")
            .help("Requests refused by tvserve's frontend plugin before any worker saw them")
            .labelNames("protocol", "status").register();

    protected ProtocolEndpoint() {
        SuppliedKeys.installOnce(); // before any port listens: TorchServe loads plugins first
        EndpointPool.installSoon();
        WorkerGauges.registerOnce();
    }

    /** The protocol's name and the routes it has, for the 405 a method it lacks gets, e.g.
     *  "KServe v1: GET /v1/models/{model}, POST /v1/models/{model}:predict". */
    abstract String routesHint();

    @Override
    public void doPut(Request req, Response rsp, Context ctx) throws IOException {
        error(rsp, 405, "PUT is not part of " + routesHint() + ".");
    }

    @Override
    public void doDelete(Request req, Response rsp, Context ctx) throws IOException {
        error(rsp, 405, "DELETE is not part of " + routesHint() + ".");
    }

    /** A client mistake the frontend can see: answered with its status and {"error": message}. */
    static final class ClientError extends Exception {
        final int status;

        ClientError(int status, String message) {
            super(message);
            this.status = status;
        }
    }

    /** Path segments after the endpoint's own, URL-decoded: /v2/models/m/infer -> [models, m, infer]. */
    static List<String> segments(Request req) {
        return segments(req.getRequestURI());
    }

    /** The same for a request URI (path and query). */
    static List<String> segments(String uri) {
        String path = uri.split("\\?", 2)[0];
        List<String> parts = new ArrayList<>();
        String[] raw = path.split("/");
        for (int i = 2; i < raw.length; i++) {
            if (!raw[i].isEmpty()) {
                parts.add(URLDecoder.decode(raw[i], StandardCharsets.UTF_8));
            }
        }
        return parts;
    }

    /** The model `name` at `version` (null: the default version); a 404 names what is served. */
    static Model model(String name, String version) throws ClientError {
        ModelManager manager = ModelManager.getInstance();
        Model model;
        try {
            model = manager.getModel(name, version);
        } catch (org.pytorch.serve.archive.model.ModelVersionNotFoundException e) {
            throw new ClientError(404, "Model '" + name + "' has no version '" + version
                    + "'; its versions: " + String.join(", ", versions(name)) + ".");
        }
        if (model == null) {
            throw new ClientError(404, "Unknown model '" + name + "'; served models: "
                    + String.join(", ", modelNames()) + ".");
        }
        return model;
    }

    static Set<String> modelNames() {
        Set<String> names = new TreeSet<>();
        for (Map.Entry<String, ModelVersionedRefs> entry : ModelManager.getInstance().getAllModels()) {
            names.add(entry.getKey());
        }
        return names;
    }

    static Set<String> versions(String name) {
        Set<String> versions = new TreeSet<>();
        try {
            for (Map.Entry<String, Model> entry : ModelManager.getInstance().getAllModelVersions(name)) {
                versions.add(entry.getKey());
            }
        } catch (org.pytorch.serve.archive.model.ModelNotFoundException e) {
            // no versions: the caller says the model is unknown
        }
        return versions;
    }

    /** Ready: at least one worker and every wanted worker READY (WORKER_MODEL_LOADED). */
    static boolean ready(Model model) {
        int loaded = WorkerGauges.readyWorkers(ModelManager.getInstance(), model);
        return loaded > 0 && loaded >= model.getMinWorkers();
    }

    /** Every version of every model is ready (false when no model is loaded). */
    static boolean serverReady() {
        boolean any = false;
        for (String name : modelNames()) {
            for (String version : versions(name)) {
                try {
                    if (!ready(model(name, version))) {
                        return false;
                    }
                } catch (ClientError e) {
                    return false; // unregistered meanwhile
                }
                any = true;
            }
        }
        return any;
    }

    static void json(Response rsp, int status, Object body) throws IOException {
        rsp.setStatus(status);
        rsp.setContentType("application/json");
        rsp.getOutputStream().write(GSON.toJson(body).getBytes(StandardCharsets.UTF_8));
    }

    /** A client mistake seen by the frontend: counted, then answered with {"error": message}. */
    static void reject(Response rsp, String protocol, ClientError mistake) throws IOException {
        REJECTED.labels(protocol, Integer.toString(mistake.status)).inc();
        error(rsp, mistake.status, mistake.getMessage());
    }

    static void error(Response rsp, int status, String message) throws IOException {
        json(rsp, status, errorBody(message));
    }

    /** {"error": message}, the body of every answer the plugin refuses or fails itself. */
    static JsonObject errorBody(String message) {
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        return body;
    }

    /** The Netty request behind the SDK's wrapper: the SDK exposes header names but not their values. */
    static FullHttpRequest nettyRequest(Request req) {
        try {
            Field field = req.getClass().getDeclaredField("req");
            field.setAccessible(true);
            return (FullHttpRequest) field.get(req);
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException("This TorchServe's plugin SDK differs from 0.12's: " + e, e);
        }
    }

    /**
     * Sends the request to `model`'s worker as one inference job with the protocol and action
     * headers, waits for its answer and copies it (status, content type, headers, body) to `rsp`.
     */
    static void forward(Request req, Response rsp, Model model, String protocol, String action)
            throws IOException {
        long arrival = System.currentTimeMillis();
        FullHttpRequest netty = nettyRequest(req);
        RequestInput input = new RequestInput(UUID.randomUUID().toString());
        for (Map.Entry<String, String> header : netty.headers().entries()) {
            input.updateHeaders(header.getKey(), header.getValue());
        }
        input.updateHeaders(PROTOCOL_HEADER, protocol);
        input.updateHeaders(ACTION_HEADER, action);
        input.updateHeaders(VERSION_HEADER, model.getVersion());
        input.updateHeaders(MODEL_HEADER, model.getModelName());
        input.updateHeaders(ARRIVAL_HEADER, Long.toString(arrival));
        input.updateHeaders("explain", "explain".equals(action) ? "True" : "False");
        byte[] body;
        try {
            body = io.netty.buffer.ByteBufUtil.getBytes(netty.content());
        } catch (io.netty.util.IllegalReferenceCountException e) {
            error(rsp, 503, "The request body was released before it could be read; retry.");
            return;
        }
        input.addParameter(new InputParameter("body", body, netty.headers().get("Content-Type")));
        input.setClientExpireTS(model.getClientTimeoutInMills());
        ForwardJob job = new ForwardJob(model.getModelName(), model.getVersion(), WorkerCommands.PREDICT, input);
        try {
            if (!ModelManager.getInstance().addJob(job)) {
                error(rsp, 503, "Model '" + model.getModelName()
                        + "' has no worker ready or its job queue is full; retry later.");
                return;
            }
        } catch (org.pytorch.serve.archive.model.ModelException e) {
            error(rsp, 404, e.getMessage());
            return;
        }
        job.copyTo(rsp, model.getResponseTimeout());
    }
}
