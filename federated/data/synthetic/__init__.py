"""The embedded synthetic MultiMed corpus: 11 tasks over 11 modalities at N origin sites.

    from federated.data.synthetic import GeneratorConfig, generate, build_synthetic_corpus
    manifest, arrays, targets = generate(GeneratorConfig(samples_per_task_site=20))
    build_synthetic_corpus("corpus/", GeneratorConfig())   # atomically, in the corpus format

The corpus is not noise with labels: every sample is rendered from latent factors through a
documented generative model, so that the questions MultiMed-FL asks (does fusing modalities
help? does a shared encoder help? does a model trained at some hospitals work at others?)
have answers built in. The model has three layers.

1. A shared world (drawn once per `seed`; the same at every site)
   - One bank of smooth spatial patterns (Gaussian blobs, rings, soft edges, gratings; see
     basis.py) from which all five image modalities build anatomy, lesions and per-patient
     anatomical variation; lesions are blobs at random positions, so convolutions help.
   - One radiograph renderer for the three X-ray tasks (radiographic findings, bone age,
     VQA): fixed chest anatomy, five finding patterns, and a skeletal-maturity pattern.
   - One clinical vocabulary (vocabulary.py): 12 concepts with 4 synonyms each, "?", and 78
     filler words, shared by disease reports and VQA questions.
   - Motifs and their weights (genomic), gene programs of cell types (scRNA).

2. Per-task latent factors and the rendering of each modality (tasks.py). Classes are
   balanced within each site; binary labels and regression targets follow their latents.
   - disease_classification (ct + text; normal / common pneumonia / novel coronavirus
     pneumonia): the CT shows pneumonia -- denser lungs and 1-4 ground-glass opacities --
     in classes 1 and 2 alike (healthy lungs vary in density and 20% carry a faint scar);
     the report mentions an exposure history in 80% of class-2 reports and 10% of others,
     which often state it negated ("denies contact"); fever/cough are uninformative. The CT
     separates {0} from {1, 2}, the text {2} from {0, 1}: only fusion separates all three.
   - breast_cancer_classification (pathology + tabular): a, b ~ N(0, 1) independent;
     malignant iff a + b + N(0, 0.25) > 0. Pathology shows a (nuclei denser, larger, darker),
     the 16 clinical features show b (plus a lesion-size and an age nuisance), so each view
     alone sees half of the evidence.
   - medical_vqa (xray + text; answers no, yes, "0".."4"): a radiograph with the five
     findings (each present with p = 0.3) and a question: 60% "is there <finding>?" (in
     any synonym), 40% "how many findings?" (4 = four or more). The question says what to
     look for, the image says what is there: neither alone answers it.
   - brain_tumor_classification (mri): glioma = intra-axial irregular mass with a dark
     oedema rim anywhere in a hemisphere; meningioma = mass touching the skull; pituitary
     = small mass at the sella; no tumour; ventricle size varies.
   - diabetic_retinopathy (oct): tilted retinal layers; drusen = bright bumps under the RPE;
     DME = dark intraretinal cysts + thickened inner retina; CNV = bright lesion at the RPE
     with dark subretinal fluid; normal.
   - radiographic_findings (xray, multi-label): five independent findings, each present
     with p = 0.3, each adding its pattern on a random side with random strength
     (atelectasis: dense lower zone; cardiomegaly: wide heart; effusion: dense costophrenic
     angle; nodule: small spot anywhere in a lung; pneumothorax: dark apex).
   - bone_age (xray, months): age ~ U(12, 216); skeletal maturity = age scaled to [0, 1] +
     N(0, 0.06) (people mature at different rates), which switches on six ossification
     centres in turn and thickens the clavicles; incidental findings with p = 0.1.
   - motor_imagery (eeg, 8 ch x 128 samples at 128 Hz): mu rhythms (8.5-12.5 Hz) of three
     motor sources over spatially correlated 1/f noise; the imagined movement weakens the
     matching source (left hand -> right motor cortex, right hand -> left, feet -> midline;
     tongue: both lateral weaker, midline stronger); trial-to-trial amplitudes vary.
   - cell_type (scrna, 10 types in 3 lineages): lineage and type marker programs on 256
     genes plus a cell-cycle nuisance program; gamma-Poisson counts at a random library
     size, normalised to 1,000 and log1p'd.
   - expression_prediction (genomic_sequence): 128 bases with planted copies of 6 motifs;
     target = 1 + sum of motif weights x occurrences + N(0, 0.5).
   - protein_structure (protein_sequence, per residue H/E/C): a segment Markov chain over
     helix / strand / coil; residues from the state's favoured set with p = 0.6; half the
     chains are 32-63 long, padded with 0 and labelled -1.

3. Per-site acquisition (acquisition.py), drawn per site from the seed and multiplied by
   `origin_shift_severity` (0 = identical sites), applied per modality, so all tasks of a site
   share its scanners and habits: images -- blur, bias field, contrast, brightness, stain
   (per-channel) gain/offset, noise level; EEG -- gain, per-electrode gain, noise, 50/60 Hz
   mains; scRNA -- gene-wise log-scale batch effects and sequencing depth; text -- synonym
   preferences, filler-word distribution, verbosity; sequences -- GC content and residue
   background; tabular -- per-feature offsets and scales (units, calibration).

Values are roughly standardised (order 1) so models need no extra normalisation; regression
targets keep their units (months, log expression) and the corpus spec records their scale.
Every random draw comes from a stream named by (seed, purpose, task, site) (seeding.py):
the same config gives byte-identical corpora on the same platform, and a corpus of fewer
tasks holds exactly the samples of the full one for those tasks.
"""

from federated.data.synthetic.build import CORPUS_NAME, build_synthetic_corpus, generate
from federated.data.synthetic.config import GeneratorConfig

__all__ = ["CORPUS_NAME", "GeneratorConfig", "build_synthetic_corpus", "generate"]
