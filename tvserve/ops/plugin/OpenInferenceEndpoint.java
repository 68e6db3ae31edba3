package tvserve.plugin;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.util.List;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.wlm.Model;

/**
 * The Open Inference Protocol v2 over REST, every path under /v2 on the inference port:
 *
 * <pre>
 * GET  /v2                                            server metadata
 * GET  /v2/health/live | /v2/health/ready             ready: every model's workers READY
 * GET  /v2/models/{m}[/versions/{v}]                  model metadata (the worker's answer)
 * GET  /v2/models/{m}[/versions/{v}]/ready
 * POST /v2/models/{m}[/versions/{v}]/infer            the worker decodes and encodes (protocol "v2")
 * POST /v2/models/{m}[/versions/{v}]/explain          tvserve's explanation extension
 * </pre>
 */
@Endpoint(urlPattern = "v2", endpointType = EndpointTypes.INFERENCE,
        description = "Open Inference Protocol v2 (REST), routed to tvserve's handler")
public class OpenInferenceEndpoint extends ProtocolEndpoint {
    static final String PROTOCOL = "v2";
    static final String[] EXTENSIONS = {"binary_tensor_data", "explain"};

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        List<String> parts = segments(req);
        try {
            if (parts.isEmpty()) {
                serverMetadata(rsp);
            } else if (parts.size() == 2 && parts.get(0).equals("health")
                    && (parts.get(1).equals("live") || parts.get(1).equals("ready"))) {
                boolean live = parts.get(1).equals("live");
                boolean ok = live || serverReady();
                JsonObject body = new JsonObject();
                body.addProperty(live ? "live" : "ready", ok);
                json(rsp, ok ? 200 : 503, body);
            } else {
                Target target = Target.parse(parts);
                Model model = model(target.model, target.version);
                if (target.action == null) {
                    forward(req, rsp, model, PROTOCOL, "metadata");
                } else if (target.action.equals("ready")) {
                    JsonObject body = new JsonObject();
                    body.addProperty("name", model.getModelName());
                    body.addProperty("ready", ready(model));
                    json(rsp, ready(model) ? 200 : 503, body);
                } else {
                    throw new ClientError(405, "GET is not allowed on " + req.getRequestURI() + ": POST to .../"
                            + target.action + ".");
                }
            }
        } catch (ClientError e) {
            reject(rsp, PROTOCOL, e);
        }
    }

    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        try {
            Target target = Target.parse(segments(req));
            if (target.action == null || !(target.action.equals("infer") || target.action.equals("explain"))) {
                throw new ClientError(405, "POST is allowed only on /v2/models/{model}[/versions/{version}]/infer"
                        + " and .../explain, not on " + req.getRequestURI() + ".");
            }
            forward(req, rsp, model(target.model, target.version), PROTOCOL, target.action);
        } catch (ClientError e) {
            reject(rsp, PROTOCOL, e);
        }
    }

    @Override
    String routesHint() {
        return "the Open Inference Protocol: GET metadata, POST .../infer";
    }

    static void serverMetadata(Response rsp) throws IOException {
        JsonObject body = new JsonObject();
        body.addProperty("name", "tvserve");
        body.addProperty("version", ProtocolEndpoint.class.getPackage().getImplementationVersion() == null
                ? "0.1.0" : ProtocolEndpoint.class.getPackage().getImplementationVersion());
        JsonArray extensions = new JsonArray();
        for (String extension : EXTENSIONS) {
            extensions.add(extension);
        }
        body.add("extensions", extensions);
        json(rsp, 200, body);
    }

    /** models/{m}[/versions/{v}][/{action}] of a /v2 path. */
    static final class Target {
        String model;
        String version;
        String action;

        static Target parse(List<String> parts) throws ClientError {
            Target target = new Target();
            int n = parts.size();
            if (n < 2 || !parts.get(0).equals("models")) {
                throw new ClientError(404, "No such Open Inference Protocol path: use /v2, /v2/health/{live,ready}, "
                        + "/v2/models/{model}[/versions/{version}][/ready|/infer|/explain].");
            }
            target.model = parts.get(1);
            int next = 2;
            if (n >= 4 && parts.get(2).equals("versions")) {
                target.version = parts.get(3);
                next = 4;
            }
            if (n == next + 1) {
                target.action = parts.get(next);
            } else if (n != next) {
                throw new ClientError(404, "No such Open Inference Protocol path: use "
                        + "/v2/models/{model}[/versions/{version}][/ready|/infer|/explain].");
            }
            if (target.action != null && !(target.action.equals("ready") || target.action.equals("infer")
                    || target.action.equals("explain"))) {
                throw new ClientError(404, "Unknown action '" + target.action + "': ready, infer or explain.");
            }
            return target;
        }
    }
}
