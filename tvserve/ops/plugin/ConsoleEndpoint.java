package tvserve.plugin;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;

/**
 * tvserve's console, every path under /console on the inference port (docs/operating.md, "The console"):
 *
 * <pre>
 * GET /console/                 the page (index.html), and its files /console/{console.js,console.css}
 * GET /console/api/models       every model version: workers, READY, batching, and its archive's record
 * GET /console/api/samples      {"samples": [file names]}: the images and clips in samples/, one click away on the page
 * GET /console/samples/{name}   one of them
 * GET /console/api/metrics      the frontend's Prometheus registry as text (what the metrics port serves)
 * </pre>
 *
 * <p>The page's files are read from the folder TVSERVE_CONSOLE_DIR names (ConsoleFiles), which
 * `tvserve serve` sets unless the configuration says `tvserve_console=false` (tvserve/ops/server.py);
 * without it every path here answers 404 saying so. Predictions go to the service's own routes
 * (/predictions, /explanations), with the same headers and key as any client's. Where the
 * configuration names the console's own address (`tvserve_console_address`), the first endpoint
 * constructed starts it (ConsoleAddress): the page's files with no key, the rest relayed here.
 */
@Endpoint(urlPattern = "console", endpointType = EndpointTypes.INFERENCE,
        description = "tvserve's console: the models, trying them in a browser, live figures")
public class ConsoleEndpoint extends ProtocolEndpoint {
    static final String PROTOCOL = "console";
    static final String RECORD_FILE = "tvserve.json"; // handlers/record.py's METADATA_FILE

    public ConsoleEndpoint() {
        ConsoleAddress.startOnce(); // the console's own address, where the configuration names one
    }

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        try {
            ConsoleFiles.pageFolder();
            List<String> parts = segments(req);
            ConsoleFiles.Page page = ConsoleFiles.find(parts);
            if (page != null) {
                file(rsp, page);
            } else if (parts.equals(List.of("api", "models"))) {
                json(rsp, 200, models());
            } else if (parts.equals(List.of("api", "samples"))) {
                json(rsp, 200, ConsoleFiles.samples());
            } else if (parts.equals(List.of("api", "metrics"))) {
                metrics(rsp);
            } else {
                throw new ClientError(404, "No such console path: use /console/, /console/api/models, "
                        + "/console/api/samples, /console/api/metrics or /console/samples/{name}.");
            }
        } catch (ClientError e) {
            reject(rsp, PROTOCOL, e);
        }
    }

    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        error(rsp, 405, "POST is not part of " + routesHint() + " (the page posts to /predictions/{model}).");
    }

    @Override
    String routesHint() {
        return "the console: GET /console/ and /console/api/{models,samples,metrics}";
    }

    static void file(Response rsp, ConsoleFiles.Page page) throws IOException {
        rsp.setStatus(200);
        rsp.setContentType(page.type());
        rsp.setHeader("Cache-Control", ConsoleFiles.CACHE_CONTROL);
        rsp.getOutputStream().write(page.bytes());
    }

    /** {"models": [...]}: each version of each model, as the frontend runs it, with its archive's record. */
    static JsonObject models() {
        JsonArray list = new JsonArray();
        ModelManager manager = ModelManager.getInstance();
        for (String name : modelNames()) {
            String defaultVersion = defaultVersion(name);
            for (String version : versions(name)) {
                Model model;
                try {
                    model = model(name, version);
                } catch (ClientError e) {
                    continue; // unregistered meanwhile
                }
                list.add(describe(manager, model, version.equals(defaultVersion)));
            }
        }
        JsonObject body = new JsonObject();
        body.add("models", list);
        return body;
    }

    static String defaultVersion(String name) {
        try {
            return model(name, null).getVersion();
        } catch (ClientError e) {
            return null;
        }
    }

    static JsonObject describe(ModelManager manager, Model model, boolean isDefault) {
        JsonObject entry = new JsonObject();
        entry.addProperty("name", model.getModelName());
        entry.addProperty("version", model.getVersion());
        entry.addProperty("default", isDefault);
        entry.addProperty("ready", ready(model));
        entry.addProperty("workers", manager.getWorkers(model.getModelVersionName()).size());
        entry.addProperty("ready_workers", WorkerGauges.readyWorkers(manager, model));
        entry.addProperty("min_workers", model.getMinWorkers());
        entry.addProperty("max_workers", model.getMaxWorkers());
        entry.addProperty("batch_size", model.getBatchSize());
        entry.addProperty("max_batch_delay_ms", model.getMaxBatchDelay());
        entry.addProperty("queued", model.getPendingRequestsInJobQueue());
        entry.add("record", record(model));
        return entry;
    }

    /** The archive's tvserve.json without its label list (its length as "label_count"); null when it has none. */
    static JsonElement record(Model model) {
        Path path = model.getModelDir().toPath().resolve(RECORD_FILE);
        try {
            JsonObject record = JsonParser.parseString(Files.readString(path, StandardCharsets.UTF_8)).getAsJsonObject();
            JsonElement labels = record.remove("labels");
            record.addProperty("label_count", labels != null && labels.isJsonArray() ? labels.getAsJsonArray().size() : 0);
            return record;
        } catch (IOException | RuntimeException e) {
            return null; // not a tvserve archive (or unreadable): the page shows the frontend's facts alone
        }
    }

    /** The frontend's Prometheus registry in the text format, as the metrics port's /metrics answers. */
    static void metrics(Response rsp) throws IOException {
        rsp.setStatus(200);
        rsp.setContentType(io.prometheus.client.exporter.common.TextFormat.CONTENT_TYPE_004);
        Writer writer = new OutputStreamWriter(rsp.getOutputStream(), StandardCharsets.UTF_8);
        io.prometheus.client.exporter.common.TextFormat.write004(
                writer, io.prometheus.client.CollectorRegistry.defaultRegistry.metricFamilySamples());
        writer.flush();
    }
}
