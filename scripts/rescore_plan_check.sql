-- How PostgreSQL plans the re-score query (core.repository.images_to_rescore) on a large table.
-- Scratch schema with the same indexes as core/tables.py; 400k images, 300k predictions by the
-- current release. Run: psql -h 127.0.0.1 -U postgres -c "create database plancheck"
--                       psql -h 127.0.0.1 -U postgres plancheck -f scripts/rescore_plan_check.sql
create table image (id text primary key, patient_id int not null, eye text, status text);
create index ix_image_patient_id_eye on image(patient_id, eye);
create index ix_image_status on image(status);
create table prediction (id serial primary key, image_id text references image(id), model_version_id int,
                         unique (image_id, model_version_id));
create index ix_prediction_mv on prediction(model_version_id);
insert into image select 'img' || g, g / 4, case when g % 2 = 0 then 'left' else 'right' end, 'done'
  from generate_series(1, 400000) g;
insert into prediction (image_id, model_version_id) select 'img' || g, 1 from generate_series(1, 400000) g;
insert into prediction (image_id, model_version_id) select 'img' || g, 2 from generate_series(1, 300000) g;
analyze;
-- the first version (NOT IN): reads every prediction of the release, for each patient written
explain analyze select id from image where patient_id = 90000 and status = 'done'
  and id not in (select image_id from prediction where model_version_id >= 2);
-- the shipped version (correlated NOT EXISTS): an index probe per photograph of the patient
explain analyze select id from image where patient_id = 90000 and status = 'done'
  and not exists (select 1 from prediction p where p.image_id = image.id and p.model_version_id >= 2);
